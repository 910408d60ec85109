-- 0001: the legacy 10-26 schema exactly as reconstructed in spec §6.1 (eleven tables).
-- Applied by telepay_shared.migrate inside one transaction; no BEGIN/COMMIT here.
--
-- Choices where §6.1 leaves a gap (each documented where it is made):
-- * currency_type: §6.1 shows only "UPPERCASE values such as 'ETH', 'BTC', 'USDT', 'LINK',
--   'MATIC', ...". The set below is the currencies the pipeline can meet plus the network codes,
--   because split_payout_hostpay.from_network has this type too. Extend with ALTER TYPE ... ADD VALUE.
-- * main_clients_database.client_payout_currency/network: the note's VARCHAR(10)/VARCHAR(50)
--   (the pipeline reads them with ::text casts, which work on either type).
-- * split_payout_request/que currency and network columns: VARCHAR(10)/VARCHAR(50), the sizes the
--   client's own registration uses, so every value that reaches them fits; unique_id VARCHAR(16)
--   because the GCSplit tokens carry it as a 16-byte field.
-- * registered_users: only the FK target main_clients_database needs (owned by the registration API).

CREATE TYPE currency_type AS ENUM (
    -- currencies: host-wallet legs (ETH, USDT, USDC, DAI) and common client payout currencies
    'ETH', 'BTC', 'USDT', 'USDC', 'DAI', 'LINK', 'MATIC', 'LTC', 'TRX', 'BNB', 'SOL',
    'XRP', 'DOGE', 'ADA', 'DOT', 'AVAX', 'SHIB', 'TON', 'BCH', 'XLM', 'ATOM', 'UNI', 'BUSD', 'POL',
    -- network codes (ChangeNOW network names, uppercased) that are not also currency tickers
    'BSC', 'ARBITRUM', 'OP', 'BASE', 'AVAXC'
);

CREATE TABLE registered_users (
    user_id    UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE main_clients_database (
    open_channel_id             VARCHAR(14) PRIMARY KEY,
    open_channel_title          VARCHAR(100),
    open_channel_description    VARCHAR(500),
    closed_channel_id           VARCHAR(14) NOT NULL,
    closed_channel_title        VARCHAR(100),
    closed_channel_description  VARCHAR(500),
    sub_1_price                 NUMERIC(10,2),
    sub_1_time                  INTEGER,
    sub_2_price                 NUMERIC(10,2),
    sub_2_time                  INTEGER,
    sub_3_price                 NUMERIC(10,2),
    sub_3_time                  INTEGER,
    client_wallet_address       VARCHAR(200),
    client_payout_currency      VARCHAR(10),
    client_payout_network       VARCHAR(50),
    payout_strategy             VARCHAR(20) DEFAULT 'instant',
    payout_threshold_usd        NUMERIC(10,2) DEFAULT 0 CHECK (payout_threshold_usd >= 0),
    payout_threshold_updated_at TIMESTAMP,
    client_id                   UUID NOT NULL REFERENCES registered_users (user_id) ON DELETE CASCADE,
    created_by                  VARCHAR(50),
    updated_at                  TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE private_channel_users_database (
    id                             SERIAL PRIMARY KEY,
    user_id                        BIGINT,
    private_channel_id             VARCHAR(14),
    sub_time                       INTEGER,
    sub_price                      NUMERIC(10,2),
    "timestamp"                    TIME,
    datestamp                      DATE,
    expire_time                    TIME,
    expire_date                    DATE,
    is_active                      BOOLEAN DEFAULT TRUE,
    payment_status                 VARCHAR(20) DEFAULT 'pending',
    nowpayments_payment_id         VARCHAR(50),
    nowpayments_invoice_id         VARCHAR(50),
    nowpayments_order_id           VARCHAR(100),
    nowpayments_pay_address        VARCHAR(255),
    nowpayments_payment_status     VARCHAR(50),
    nowpayments_pay_amount         DECIMAL(30,18),
    nowpayments_pay_currency       VARCHAR(20),
    nowpayments_outcome_amount     DECIMAL(30,18),
    nowpayments_price_amount       DECIMAL(20,8),
    nowpayments_price_currency     VARCHAR(10),
    nowpayments_outcome_currency   VARCHAR(10),
    nowpayments_outcome_amount_usd DECIMAL(20,8),
    nowpayments_created_at         TIMESTAMP,
    nowpayments_updated_at         TIMESTAMP
);
CREATE INDEX idx_nowpayments_payment_id ON private_channel_users_database (nowpayments_payment_id);
CREATE INDEX idx_nowpayments_order_id ON private_channel_users_database (nowpayments_order_id);
CREATE INDEX idx_nowpayments_order_id_status
    ON private_channel_users_database (nowpayments_order_id, payment_status);

CREATE TABLE processed_payments (
    payment_id              BIGINT PRIMARY KEY CHECK (payment_id > 0),
    user_id                 BIGINT NOT NULL CHECK (user_id > 0),
    channel_id              BIGINT NOT NULL,
    gcwebhook1_processed    BOOLEAN DEFAULT FALSE,
    gcwebhook1_processed_at TIMESTAMP,
    telegram_invite_sent    BOOLEAN DEFAULT FALSE,
    telegram_invite_sent_at TIMESTAMP,
    telegram_invite_link    TEXT,
    created_at              TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at              TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX idx_processed_payments_user_channel ON processed_payments (user_id, channel_id);
CREATE INDEX idx_processed_payments_invite_sent ON processed_payments (telegram_invite_sent);
CREATE INDEX idx_processed_payments_webhook1_processed ON processed_payments (gcwebhook1_processed);
CREATE INDEX idx_processed_payments_created_at ON processed_payments (created_at DESC);

CREATE TABLE batch_conversions (
    id                    SERIAL PRIMARY KEY,
    batch_conversion_id   UUID NOT NULL UNIQUE,
    total_eth_usd         NUMERIC(20,8) NOT NULL,
    threshold_at_creation NUMERIC(20,2) NOT NULL,
    cn_api_id             VARCHAR(255),
    payin_address         VARCHAR(255),
    conversion_status     VARCHAR(20) DEFAULT 'pending',
    actual_usdt_received  NUMERIC(20,8),
    conversion_tx_hash    VARCHAR(255),
    created_at            TIMESTAMP DEFAULT NOW(),
    processing_started_at TIMESTAMP,
    completed_at          TIMESTAMP
);
CREATE INDEX idx_batch_conversions_status ON batch_conversions (conversion_status);
CREATE INDEX idx_batch_conversions_cn_api_id ON batch_conversions (cn_api_id);
CREATE INDEX idx_batch_conversions_created_at ON batch_conversions (created_at);

CREATE TABLE payout_batches (
    batch_id               VARCHAR(50) PRIMARY KEY,
    client_id              VARCHAR(14) NOT NULL,
    client_wallet_address  VARCHAR(200) NOT NULL,
    client_payout_currency VARCHAR(10) NOT NULL,
    client_payout_network  VARCHAR(50) NOT NULL,
    total_amount_usdt      NUMERIC(18,8) NOT NULL,
    total_payments_count   INTEGER NOT NULL,
    payout_amount_crypto   NUMERIC(18,8),
    usdt_to_crypto_rate    NUMERIC(18,8),
    conversion_fee         NUMERIC(18,8),
    cn_api_id              VARCHAR(100),
    cn_payin_address       VARCHAR(200),
    tx_hash                VARCHAR(100),
    tx_status              VARCHAR(20),
    status                 VARCHAR(20) DEFAULT 'pending',
    created_at             TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    processing_started_at  TIMESTAMP,
    completed_at           TIMESTAMP
);
CREATE INDEX idx_payout_batches_client_id ON payout_batches (client_id);
CREATE INDEX idx_payout_batches_status ON payout_batches (status);
CREATE INDEX idx_payout_batches_created_at ON payout_batches (created_at);

CREATE TABLE payout_accumulation (
    id                         SERIAL PRIMARY KEY,
    client_id                  VARCHAR(14) NOT NULL,
    user_id                    BIGINT NOT NULL,
    subscription_id            INTEGER,
    payment_amount_usd         NUMERIC(10,2) NOT NULL,
    payment_currency           VARCHAR(10) NOT NULL,
    payment_timestamp          TIMESTAMP NOT NULL,
    accumulated_amount_usdt    NUMERIC(18,8) NOT NULL,
    eth_to_usdt_rate           NUMERIC(18,8),
    conversion_timestamp       TIMESTAMP,
    conversion_tx_hash         VARCHAR(100),
    client_wallet_address      VARCHAR(200) NOT NULL,
    client_payout_currency     VARCHAR(10) NOT NULL,
    client_payout_network      VARCHAR(50) NOT NULL,
    is_paid_out                BOOLEAN DEFAULT FALSE,
    payout_batch_id            VARCHAR(50),
    paid_out_at                TIMESTAMP,
    created_at                 TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at                 TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    conversion_status          VARCHAR(50) DEFAULT 'pending',
    conversion_attempts        INTEGER DEFAULT 0,
    last_conversion_attempt    TIMESTAMP,
    nowpayments_payment_id     VARCHAR(50),
    nowpayments_pay_address    VARCHAR(255),
    nowpayments_outcome_amount DECIMAL(30,18),
    nowpayments_network_fee    DECIMAL(30,18),
    payment_fee_usd            DECIMAL(20,8),
    batch_conversion_id        UUID REFERENCES batch_conversions (batch_conversion_id)
);
CREATE INDEX idx_payout_accumulation_client_paid ON payout_accumulation (client_id, is_paid_out);
CREATE INDEX idx_payout_accumulation_payout_batch_id ON payout_accumulation (payout_batch_id);
CREATE INDEX idx_payout_accumulation_user_id ON payout_accumulation (user_id);
CREATE INDEX idx_payout_accumulation_payment_timestamp ON payout_accumulation (payment_timestamp);
CREATE INDEX idx_payout_accumulation_conversion_status ON payout_accumulation (conversion_status);
CREATE INDEX idx_payout_accumulation_nowpayments_payment_id ON payout_accumulation (nowpayments_payment_id);
CREATE INDEX idx_payout_accumulation_nowpayments_pay_address ON payout_accumulation (nowpayments_pay_address);
CREATE INDEX idx_payout_accumulation_batch_conversion_id ON payout_accumulation (batch_conversion_id);

CREATE TABLE split_payout_request (
    unique_id             VARCHAR(16) PRIMARY KEY,
    user_id               BIGINT,
    closed_channel_id     VARCHAR(14),
    from_currency         VARCHAR(10),
    to_currency           VARCHAR(10),
    from_network          VARCHAR(50),
    to_network            VARCHAR(50),
    from_amount           NUMERIC(20,8),
    to_amount             NUMERIC(30,8),
    client_wallet_address VARCHAR(200),
    refund_address        VARCHAR(200),
    flow                  VARCHAR(20),
    type                  VARCHAR(20),
    actual_eth_amount     NUMERIC(20,18) DEFAULT 0
        CONSTRAINT actual_eth_positive CHECK (actual_eth_amount >= 0),
    created_at            TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX idx_split_payout_request_actual_eth
    ON split_payout_request (actual_eth_amount) WHERE actual_eth_amount > 0;

CREATE TABLE split_payout_que (
    id                SERIAL PRIMARY KEY,
    unique_id         VARCHAR(16),
    cn_api_id         VARCHAR(100),
    user_id           BIGINT,
    closed_channel_id VARCHAR(14),
    from_currency     VARCHAR(10),
    to_currency       VARCHAR(10),
    from_network      VARCHAR(50),
    to_network        VARCHAR(50),
    from_amount       NUMERIC(20,8),
    to_amount         NUMERIC(30,8),
    payin_address     VARCHAR(200),
    payout_address    VARCHAR(200),
    refund_address    VARCHAR(200),
    flow              VARCHAR(20),
    type              VARCHAR(20),
    actual_eth_amount NUMERIC(20,18) DEFAULT 0
        CONSTRAINT actual_eth_positive_que CHECK (actual_eth_amount >= 0),
    created_at        TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE split_payout_hostpay (
    unique_id         VARCHAR(64) NOT NULL,
    cn_api_id         VARCHAR(16) NOT NULL,
    from_currency     currency_type NOT NULL,
    from_network      currency_type NOT NULL,
    from_amount       NUMERIC(20,8),
    payin_address     VARCHAR(95) NOT NULL,
    is_complete       BOOLEAN NOT NULL DEFAULT FALSE,
    created_at        TIMESTAMPTZ DEFAULT now(),
    updated_at        TIMESTAMPTZ DEFAULT now(),
    tx_hash           VARCHAR(66),
    tx_status         VARCHAR(20) DEFAULT 'pending',
    gas_used          INTEGER,
    block_number      INTEGER,
    actual_eth_amount NUMERIC(20,18) DEFAULT 0
        CONSTRAINT actual_eth_positive_hostpay CHECK (actual_eth_amount >= 0)
);

CREATE TABLE failed_transactions (
    id                     SERIAL PRIMARY KEY,
    unique_id              VARCHAR(16) NOT NULL,
    cn_api_id              VARCHAR(16) NOT NULL,
    from_currency          VARCHAR(10) NOT NULL,
    from_network           VARCHAR(10) NOT NULL,
    from_amount            NUMERIC(18,8) NOT NULL,
    payin_address          VARCHAR(100) NOT NULL,
    context                VARCHAR(20) NOT NULL DEFAULT 'instant',
    error_code             VARCHAR(50) NOT NULL,
    error_message          TEXT,
    last_error_details     JSONB,
    attempt_count          INTEGER NOT NULL DEFAULT 3,
    last_attempt_timestamp TIMESTAMP NOT NULL,
    status                 VARCHAR(30) NOT NULL DEFAULT 'failed_pending_review',
    retry_count            INTEGER NOT NULL DEFAULT 0,
    last_retry_attempt     TIMESTAMP,
    recovery_tx_hash       VARCHAR(100),
    recovered_at           TIMESTAMP,
    recovered_by           VARCHAR(50),
    admin_notes            TEXT,
    created_at             TIMESTAMP NOT NULL DEFAULT NOW(),
    updated_at             TIMESTAMP NOT NULL DEFAULT NOW()
);
CREATE INDEX idx_failed_transactions_unique_id ON failed_transactions (unique_id);
CREATE INDEX idx_failed_transactions_cn_api_id ON failed_transactions (cn_api_id);
CREATE INDEX idx_failed_transactions_status ON failed_transactions (status);
CREATE INDEX idx_failed_transactions_error_code ON failed_transactions (error_code);
CREATE INDEX idx_failed_transactions_created_at ON failed_transactions (created_at DESC);
CREATE INDEX idx_failed_transactions_retryable
    ON failed_transactions (status, error_code, created_at)
    WHERE status IN ('failed_retryable', 'retry_scheduled');
