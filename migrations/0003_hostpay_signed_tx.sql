-- 0003: GCHostPay3 commits the signed transfer before broadcasting it (defect 13).
-- Legacy signed a new transaction, with a fresh nonce, on every retry while the first one could
-- still be mined, and paid twice. The rewrite records the transfer (nonce, tx_hash and the signed
-- raw transaction) in split_payout_hostpay and commits, then broadcasts; a redelivery or retry
-- rebroadcasts exactly these bytes (same nonce, same hash) and never signs another transaction.
-- New columns are nullable: legacy rows, written after the fact, have neither.

-- The signed raw transaction, 0x-hex, exactly as broadcast (defect 13).
ALTER TABLE split_payout_hostpay ADD COLUMN signed_tx TEXT;

-- The host wallet that signed it: the next nonce is allocated per sending address, so rotating the
-- host wallet cannot make a new wallet start from the old wallet's nonces (defect 13).
ALTER TABLE split_payout_hostpay ADD COLUMN sender_address VARCHAR(42);

-- One recorded transaction per nonce of a wallet (defect 13): two recorded transfers can never
-- share a nonce, so one of them could never be silently dropped by the chain. Legacy rows (NULLs) are exempt.
ALTER TABLE split_payout_hostpay
    ADD CONSTRAINT split_payout_hostpay_sender_nonce_key UNIQUE (sender_address, nonce);
