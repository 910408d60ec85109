-- 0002: the constraints the rewrite's idempotency rests on, and the legacy size limits it removes.
-- Wire-compatible with the legacy services still running beside us: columns are only widened,
-- new columns are nullable, and the legacy writers never put two rows where a key is now unique
-- except in the duplicate-payment cases these constraints exist to stop (§11).
-- A production database must have no such duplicates left before this runs (check with GROUP BY ... HAVING COUNT(*) > 1).

-- Defect 21: a redelivered GCAccumulator task credited the same NowPayments payment twice.
ALTER TABLE payout_accumulation
    ADD CONSTRAINT payout_accumulation_nowpayments_payment_id_key UNIQUE (nowpayments_payment_id);

-- Defects 8, 9 (and 3 for batch payouts): one payout request per payment, keyed e.g. 'np:<payment_id>' or 'batch:<batch_id>'.
ALTER TABLE split_payout_request ADD COLUMN idempotency_key VARCHAR(100);
ALTER TABLE split_payout_request
    ADD CONSTRAINT split_payout_request_idempotency_key_key UNIQUE (idempotency_key);

-- Defect 9: GCSplit1 deduped on cn_api_id by check-then-insert; the key makes the check race-free.
ALTER TABLE split_payout_que ADD CONSTRAINT split_payout_que_cn_api_id_key UNIQUE (cn_api_id);

-- Defect 9: a redelivered GCSplit3 task created a second exchange for the same payout request.
ALTER TABLE split_payout_que ADD CONSTRAINT split_payout_que_unique_id_key UNIQUE (unique_id);

-- Defects 11, 12: at most one host-wallet transfer per unique_id, recorded before the funds move.
ALTER TABLE split_payout_hostpay ADD CONSTRAINT split_payout_hostpay_unique_id_key UNIQUE (unique_id);

-- Defect 13: the nonce is stored before broadcasting so a retry re-checks that transaction instead of sending a new one.
ALTER TABLE split_payout_hostpay ADD COLUMN nonce BIGINT;

-- Defect 17: one exchange funds at most one micro-batch conversion.
ALTER TABLE batch_conversions ADD CONSTRAINT batch_conversions_cn_api_id_key UNIQUE (cn_api_id);

-- Defect 26: batch conversion ids ('batch_<uuid>', 42 chars) did not fit VARCHAR(16).
ALTER TABLE failed_transactions ALTER COLUMN unique_id TYPE VARCHAR(64);

-- Defect 34: NUMERIC(20,18) capped actual_eth_amount below 100 ETH.
ALTER TABLE split_payout_request ALTER COLUMN actual_eth_amount TYPE NUMERIC(38,18);
ALTER TABLE split_payout_que ALTER COLUMN actual_eth_amount TYPE NUMERIC(38,18);
ALTER TABLE split_payout_hostpay ALTER COLUMN actual_eth_amount TYPE NUMERIC(38,18);
