//! What to do about an authentication or access failure, for the condition message. Keyed
//! by Entra's AADSTS codes (the `error_codes` of a token error, else the code the
//! description starts with) and by Graph's 403s. docs/entra.md has the commands.

/// A remediation for a token endpoint refusal, when the code is one people commonly meet.
pub fn aadsts(code: u64) -> Option<&'static str> {
    Some(match code {
        7000215 => {
            "the client secret is wrong: put the secret's Value (not its Secret ID) into the Secret, or create a new one (az ad app credential reset --id <client-id> --append)"
        }
        7000222 => {
            "the client secret has expired: create a new one (az ad app credential reset --id <client-id> --append) and update the Secret; it is picked up within seconds"
        }
        700016 => {
            "no application with this client id in the tenant: check clientId (the Application (client) ID, not the object id) and tenantId, and that the app has a service principal in this tenant (admin consent)"
        }
        7000229 => {
            "the application has no service principal in this tenant: create one (az ad sp create --id <client-id>) and grant admin consent"
        }
        90002 | 90072 => {
            "the tenant id is not a tenant this authority knows: use the Directory (tenant) ID; in a national cloud, also set the authority and Graph URLs of that cloud"
        }
        700027 => {
            "the client assertion was refused: the certificate is not registered on the app (upload it: az ad app credential reset --id <client-id> --cert @cert.pem --append), has expired, or tls.crt and tls.key do not belong together"
        }
        70021 | 700213 | 700211 | 700212 => {
            "no federated credential of the app matches the service account token: its issuer must be the cluster's OIDC issuer URL, its subject system:serviceaccount:<namespace>:<service-account> of the operator, its audience api://AzureADTokenExchange (az ad app federated-credential list --id <client-id>)"
        }
        700024 => {
            "the client assertion is outside its validity period: check the node's clock, and for workload identity that the projected token file is being refreshed"
        }
        7000112 => {
            "the application is disabled in this tenant: enable its service principal (Enterprise applications, Properties, Enabled for users to sign in)"
        }
        500011 => {
            "the Graph resource was not found in this tenant: the Graph URL does not belong to the authority's cloud (national clouds need both URLs of the same cloud)"
        }
        53003 => {
            "a Conditional Access policy for workload identities blocked the app: allow the cluster's egress addresses or exclude the app"
        }
        _ => return None,
    })
}

/// The AADSTS code of a token error: the first of `error_codes`, else the number after
/// `AADSTS` at the start of the description.
pub fn code_of(error_codes: &[u64], description: &str) -> Option<u64> {
    if let Some(code) = error_codes.first() {
        return Some(*code);
    }
    let rest = description.trim_start().strip_prefix("AADSTS")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What to do when Graph answers 403 for a mailbox.
pub const ACCESS_DENIED: &str = "the app may not read this mailbox: grant the Graph application permission Mail.Read (Mail.ReadWrite for markAsRead or moveToFolder) with admin consent, and check that the mailbox is inside the app's Exchange Online scope (Test-ServicePrincipalAuthorization for RBAC for Applications, Test-ApplicationAccessPolicy for an application access policy); changes to either can take an hour or more to apply";

/// What to do when Graph refused a freshly issued token.
pub const TOKEN_REFUSED: &str = "Graph refused a fresh token: check that the Graph URL and the authority URL belong to the same cloud";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_codes_have_hints() {
        for code in [
            7000215, 7000222, 700016, 90002, 700027, 70021, 700213, 700024,
        ] {
            assert!(aadsts(code).is_some(), "AADSTS{code}");
        }
        assert!(aadsts(12345).is_none());
        assert!(aadsts(7000215).is_some_and(|hint| hint.contains("Value")));
        assert!(aadsts(70021).is_some_and(|hint| hint.contains("api://AzureADTokenExchange")));
    }

    #[test]
    fn codes_come_from_the_list_or_the_description() {
        assert_eq!(code_of(&[7000215], "AADSTS1: x"), Some(7000215));
        assert_eq!(
            code_of(&[], "AADSTS700016: Application with identifier"),
            Some(700016)
        );
        assert_eq!(code_of(&[], "something else"), None);
        assert_eq!(code_of(&[], "AADSTS: no digits"), None);
    }
}
