-- 0004: an index for the lookup every payment makes of the customer's newest subscription row.
-- np-webhook (three times), GCWebhook1 and GCWebhook2 each ask private_channel_users_database for
-- "WHERE user_id = ? AND private_channel_id = ? ORDER BY id DESC LIMIT 1"; the legacy schema has no
-- index for it, so every one of those queries read the whole table, which gains a row per payment:
-- each payment cost more than the one before (measured on the local stack: ~0.6 ms of PostgreSQL CPU
-- per query at 4,500 rows, growing linearly). The index serves the filter and the order together.
-- Adding an index changes nothing the legacy services read or write. On a large production table run
-- the same statement with CONCURRENTLY by hand first (it cannot run inside this migration's
-- transaction); this file then finds it and does nothing.
CREATE INDEX IF NOT EXISTS idx_private_channel_users_user_channel
    ON private_channel_users_database (user_id, private_channel_id, id);
