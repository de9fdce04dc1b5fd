-- mailpoll's initial schema: the task queue, the per-mailbox cursor and the message ledger.
-- Applied by `mailpoll migrate` and at operator start-up under sqlx's advisory lock, so
-- replicas that start together apply it once.

-- ---------------------------------------------------------------------------------------------
-- Task queue: one table, every state transition done by one named operation in src/queue.
--
--   pending ──claim──► running ──complete──► succeeded ──(retention)──► pruned
--      ▲                  │ fail (attempts left: backoff)       │
--      └──────────────────┤ lease expired: rescue              │
--                         └ fail (no attempts left) ──► dead ◄─┘ (retry by a person: pending)
--   pending/running ──cancel (owner deleted)──► cancelled
-- ---------------------------------------------------------------------------------------------
CREATE TABLE tasks (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind             text        NOT NULL CHECK (kind <> ''),
    state            text        NOT NULL DEFAULT 'pending'
                                 CHECK (state IN ('pending', 'running', 'succeeded', 'dead', 'cancelled')),
    payload          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- The MailboxPoll (by uid) the task works for, so tasks of a deleted resource can be swept.
    owner_uid        uuid,
    -- While a task with this key is pending or running, enqueueing the key again returns it.
    dedupe_key       text,
    run_at           timestamptz NOT NULL DEFAULT now(),
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer     NOT NULL DEFAULT 8 CHECK (max_attempts BETWEEN 1 AND 1000),
    -- Lease of the worker running the task. lock_token is fresh on every claim: completing or
    -- failing requires it, so a worker whose lease was taken over changes nothing (fencing).
    locked_by        text,
    lock_token       uuid,
    lease_expires_at timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    CONSTRAINT running_has_lease CHECK (
        state <> 'running' OR (locked_by IS NOT NULL AND lock_token IS NOT NULL AND lease_expires_at IS NOT NULL)
    ),
    CONSTRAINT finished_has_time CHECK (
        state NOT IN ('succeeded', 'dead', 'cancelled') OR finished_at IS NOT NULL
    )
);

-- At most one live task per dedupe key (a poll per mailbox, a poll per poll-requested-at value).
CREATE UNIQUE INDEX tasks_live_dedupe_key ON tasks (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND state IN ('pending', 'running');

-- Claim: due pending tasks in run_at order, per kind.
CREATE INDEX tasks_claimable ON tasks (kind, run_at, id) WHERE state = 'pending';

-- Rescue: running tasks whose lease ran out.
CREATE INDEX tasks_running_lease ON tasks (lease_expires_at) WHERE state = 'running';

-- Retention and operations: finished tasks by age, dead tasks for people to look at.
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE state IN ('succeeded', 'cancelled');
CREATE INDEX tasks_dead ON tasks (kind, finished_at) WHERE state = 'dead';

-- Sweep of deleted MailboxPolls and per-mailbox status counts.
CREATE INDEX tasks_owner_live ON tasks (owner_uid, kind) WHERE state IN ('pending', 'running');

-- The queue table is the hottest in the database: vacuum and analyze it often so dead tuples
-- and stale statistics do not slow down claims.
ALTER TABLE tasks SET (
    fillfactor = 85,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);

-- ---------------------------------------------------------------------------------------------
-- Cursor: where the next poll of a MailboxPoll starts, plus shared Graph throttling state.
-- The cursor only advances in the transaction that records the page's messages.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE mailbox_cursors (
    mailbox_uid         uuid        PRIMARY KEY,
    namespace           text        NOT NULL,
    name                text        NOT NULL,
    -- The source the cursor belongs to; a different mailbox or folder starts from scratch.
    mailbox             text        NOT NULL,
    folder              text        NOT NULL,
    -- Delta link of the last finished round (the normal cursor).
    delta_link          text,
    -- Continuation of a round in progress, saved per committed page, dropped at round end.
    round_next_link     text,
    -- Highest receivedDateTime recorded: bounds resyncs and the fallback filter mode.
    watermark           timestamptz,
    resyncs             bigint      NOT NULL DEFAULT 0,
    -- Retry-After from Graph, honoured by every replica for this mailbox.
    throttled_until     timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- One row per poll, for status, events and operations.
CREATE TABLE polls (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mailbox_uid     uuid        NOT NULL,
    task_id         bigint,
    -- The poll-requested-at value that forced this poll, when it was forced.
    poll_request    text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    outcome         text        CHECK (outcome IN ('succeeded', 'failed')),
    pages           integer     NOT NULL DEFAULT 0,
    graph_requests  integer     NOT NULL DEFAULT 0,
    messages_seen   integer     NOT NULL DEFAULT 0,
    messages_new    integer     NOT NULL DEFAULT 0,
    resynced        boolean     NOT NULL DEFAULT false,
    error_reason    text,
    error_message   text
);
CREATE INDEX polls_by_mailbox ON polls (mailbox_uid, started_at DESC);

-- ---------------------------------------------------------------------------------------------
-- Ledger: every message ever seen, once per (MailboxPoll uid, immutable Graph id).
-- A usable inbox for downstream systems; see README for the columns.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE messages (
    mailbox_uid          uuid        NOT NULL,
    -- Immutable Graph id (Prefer: IdType="ImmutableId"); case-sensitive, so plain text.
    message_id           text        NOT NULL CHECK (message_id <> ''),
    -- Insertion order, for consumers that read the ledger incrementally.
    seq                  bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    internet_message_id  text,
    subject              text,
    from_address         text,
    from_name            text,
    sender_address       text,
    sender_name          text,
    to_recipients        jsonb       NOT NULL DEFAULT '[]'::jsonb,
    cc_recipients        jsonb       NOT NULL DEFAULT '[]'::jsonb,
    reply_to             jsonb       NOT NULL DEFAULT '[]'::jsonb,
    received_at          timestamptz,
    sent_at              timestamptz,
    is_read              boolean,
    has_attachments      boolean,
    importance           text,
    conversation_id      text,
    parent_folder_id     text,
    body_preview         text,
    body_content_type    text,
    body                 text,
    body_truncated       boolean     NOT NULL DEFAULT false,
    raw                  jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Set when Graph reported the message deleted or moved out (@removed); never delivered.
    removed_at           timestamptz,
    removed_reason       text,
    recorded_at          timestamptz NOT NULL DEFAULT now(),
    -- none: nothing to deliver; pending: a deliver task exists; delivered; failed: task dead;
    -- skipped: tombstone or removed before delivery.
    delivery_state       text        NOT NULL DEFAULT 'pending'
                                     CHECK (delivery_state IN ('none', 'pending', 'delivered', 'failed', 'skipped')),
    delivered_at         timestamptz,
    delivery_error       text,
    PRIMARY KEY (mailbox_uid, message_id)
);
CREATE INDEX messages_by_received ON messages (mailbox_uid, received_at);
CREATE INDEX messages_undelivered ON messages (mailbox_uid, delivery_state)
    WHERE delivery_state IN ('pending', 'failed');
