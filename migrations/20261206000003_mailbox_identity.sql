-- The ledger identity of a MailboxPoll: what its messages and idempotency keys are keyed by.
-- It belongs to (namespace, name, mailbox, folder), not to the Kubernetes object, so deleting
-- and re-creating the same MailboxPoll (a GitOps re-sync, a restore, a cluster move) continues
-- its ledger: nothing is delivered again under new keys.
CREATE TABLE mailbox_identities (
    namespace   text        NOT NULL,
    name        text        NOT NULL,
    -- Lower-cased: Graph treats mailbox addresses case-insensitively.
    mailbox     text        NOT NULL,
    folder      text        NOT NULL,
    identity    uuid        NOT NULL UNIQUE,
    -- The uid of the Kubernetes object that uses the identity now (the latest one seen).
    uid         uuid        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name, mailbox, folder)
);
CREATE INDEX mailbox_identities_by_uid ON mailbox_identities (uid);

-- Ledgers written before identities existed are keyed by their MailboxPoll's uid: that uid
-- becomes their identity, so they continue unchanged.
INSERT INTO mailbox_identities (namespace, name, mailbox, folder, identity, uid)
SELECT namespace, name, lower(mailbox), folder, mailbox_uid, mailbox_uid
FROM mailbox_cursors
ON CONFLICT DO NOTHING;
