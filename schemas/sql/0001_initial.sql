-- Sluice's tables. Applied in order by `sluice db migrate`, each migration once,
-- in the schema named by `postgres.schema`.

-- History: one row per symbol and trading day, the model's 105 features.
CREATE TABLE IF NOT EXISTS features (
    symbol      text    NOT NULL,
    trade_date  date    NOT NULL,
    features    real[]  NOT NULL,
    PRIMARY KEY (symbol, trade_date)
);

-- Saved predictions, one row per event: a re-delivered prediction never makes
-- a second row. as_of is the window's date (a backfill's step date).
CREATE TABLE IF NOT EXISTS stock_predictions (
    event_id          text         PRIMARY KEY,
    symbol            text         NOT NULL,
    as_of             date         NOT NULL,
    predicted_return  real         NOT NULL,
    confidence        real         NOT NULL,
    model_name        text         NOT NULL,
    model_version     text         NOT NULL,
    cached            boolean      NOT NULL DEFAULT false,
    created_at        timestamptz  NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS stock_predictions_symbol_as_of ON stock_predictions (symbol, as_of);

-- Query intents (the text model), one row per event.
CREATE TABLE IF NOT EXISTS query_intents (
    event_id       text         PRIMARY KEY,
    query_text     text         NOT NULL,
    label          text         NOT NULL,
    confidence     real         NOT NULL,
    top_labels     jsonb        NOT NULL,
    model_name     text         NOT NULL,
    model_version  text         NOT NULL,
    cached         boolean      NOT NULL DEFAULT false,
    created_at     timestamptz  NOT NULL DEFAULT now()
);
