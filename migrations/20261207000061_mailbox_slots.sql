-- Graph allows 4 concurrent requests per application and mailbox, whoever sends them: every
-- replica, every MailboxPoll of the mailbox (one per folder), polls and after-actions alike.
-- Each row is one of those slots; a request holds one (a `$batch`, up to four) for as long as
-- it is in flight. `held_until` bounds a slot whose holder died without giving it back.
CREATE TABLE mailbox_slots (
    -- The application: "<tenant id>/<client id>", lower-cased.
    app         text        NOT NULL,
    -- Lower-cased: Graph treats mailbox addresses case-insensitively.
    mailbox     text        NOT NULL,
    slot        smallint    NOT NULL,
    holder      uuid,
    held_until  timestamptz,
    PRIMARY KEY (app, mailbox, slot)
);

-- Taken and given back with every Graph request: keep dead tuples from piling up.
ALTER TABLE mailbox_slots SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.01);

-- Requests for a single slot (a poll's page, a message) that found every slot taken. While
-- one waits, a `$batch` (which holds up to all four slots for its whole run) takes none, so a
-- backlog of after-actions cannot keep a mailbox's polls out. A waiter that stopped asking
-- (`seen_at` a few seconds old) no longer counts.
CREATE TABLE mailbox_slot_waiters (
    app      text        NOT NULL,
    mailbox  text        NOT NULL,
    waiter   uuid        NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app, mailbox, waiter)
);
