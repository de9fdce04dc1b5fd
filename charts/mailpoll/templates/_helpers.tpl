{{/* Chart name, overridable. */}}
{{- define "mailpoll.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name; 63 characters is the DNS label limit. */}}
{{- define "mailpoll.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mailpoll.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "mailpoll.labels" -}}
helm.sh/chart: {{ include "mailpoll.chart" . }}
{{ include "mailpoll.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailpoll
{{- end }}

{{/* Labels that select the operator pods; never change them in an upgrade. */}}
{{- define "mailpoll.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailpoll.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "mailpoll.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "mailpoll.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mailpoll.postgresql.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailpoll.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: postgresql
{{- end }}

{{- define "mailpoll.postgresql.labels" -}}
helm.sh/chart: {{ include "mailpoll.chart" . }}
{{ include "mailpoll.postgresql.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailpoll
{{- end }}

{{- define "mailpoll.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailpoll.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mailpoll.leaseName" -}}
{{- default (printf "%s-leader" (include "mailpoll.fullname" .)) .Values.operator.leaderElection.leaseName | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mailpoll.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The Secret holding the Postgres connection: the user's, or the bundled Postgres' generated one.
*/}}
{{- define "mailpoll.database.secretName" -}}
{{- if .Values.postgresql.enabled }}
{{- include "mailpoll.postgresql.fullname" . }}
{{- else }}
{{- required "database.existingSecret is required: name the Secret holding the Postgres connection (see the Install section of the mailpoll README), or set postgresql.enabled=true to try mailpoll with a bundled Postgres" .Values.database.existingSecret }}
{{- end }}
{{- end }}

{{- define "mailpoll.secretReaderName" -}}
{{- printf "%s-secret-reader" (include "mailpoll.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Rules the operator needs wherever it handles MailboxPolls. Keep them equal to what the operator
calls: tests/chart checks the rendered rules against the recorded calls, both ways.
Events go through events.k8s.io/v1 (kube-runtime's Recorder creates, then patches a series);
core/v1 Events are not used.
*/}}
{{- define "mailpoll.rbac.watchRules" -}}
- apiGroups: ["mailpoll.dev"]
  resources: ["mailboxpolls"]
  verbs: ["list", "watch"]
- apiGroups: ["mailpoll.dev"]
  resources: ["mailboxpolls/status"]
  verbs: ["patch"]
{{- if eq .Values.rbac.secretAccess "cluster" }}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
The Entra authority and Graph root of the chosen cloud; a URL set in the values wins.
*/}}
{{- define "mailpoll.cloudUrls" -}}
{{- $presets := dict
  "public" (list "https://login.microsoftonline.com" "https://graph.microsoft.com")
  "usGov" (list "https://login.microsoftonline.us" "https://graph.microsoft.us")
  "usGovDoD" (list "https://login.microsoftonline.us" "https://dod-graph.microsoft.us")
  "china" (list "https://login.chinacloudapi.cn" "https://microsoftgraph.chinacloudapi.cn") -}}
{{- $preset := get $presets .Values.cloud.name -}}
{{- $authority := default (index $preset 0) .Values.cloud.authorityUrl -}}
{{- $graph := default (index $preset 1) .Values.cloud.graphUrl -}}
{{- dict "authority" $authority "graph" $graph | toJson -}}
{{- end }}

{{/*
Where the chart mounts the projected service account token when the workload identity
webhook does not (the same path the webhook uses).
*/}}
{{- define "mailpoll.federatedTokenDir" -}}
/var/run/secrets/azure/tokens
{{- end }}

{{/* The admission webhook's Service name, certificate Secret and cert-manager Certificate. */}}
{{- define "mailpoll.admission.secretName" -}}
{{- printf "%s-admission-tls" (include "mailpoll.fullname" .) }}
{{- end }}

{{- define "mailpoll.admission.certificateName" -}}
{{- printf "%s-admission" (include "mailpoll.fullname" .) }}
{{- end }}

{{/* Where the operator reads the admission certificate. */}}
{{- define "mailpoll.admission.certDir" -}}
/etc/mailpoll/admission-tls
{{- end }}
