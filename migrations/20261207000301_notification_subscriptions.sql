-- The Graph change-notification subscription of each MailboxPoll with notifications on. The
-- leader creates, renews and deletes subscriptions; any replica's notification endpoint reads
-- a row to check a notification's clientState and to find the MailboxPoll to wake, and flags
-- lifecycle events (renew, re-create) for the leader.
CREATE TABLE notification_subscriptions (
    mailbox_uid           uuid        PRIMARY KEY,
    namespace             text        NOT NULL,
    name                  text        NOT NULL,
    -- Graph's id; NULL until Graph accepted the subscription.
    subscription_id       text        UNIQUE,
    -- The random secret Graph echoes in every notification (compared in constant time).
    client_state          text        NOT NULL,
    -- The folder subscribed to (a change of folder needs a new subscription).
    folder                text        NOT NULL,
    expires_at            timestamptz,
    -- Set by the endpoint on `reauthorizationRequired`: renew at the next pass.
    renew_requested       boolean     NOT NULL DEFAULT false,
    last_notification_at  timestamptz,
    -- Why the last create or renew failed (for the condition); NULL when it worked.
    last_error            text,
    updated_at            timestamptz NOT NULL DEFAULT now()
);
