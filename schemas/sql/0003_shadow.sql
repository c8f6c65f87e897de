-- A rollout's shadow answers (docs/operations.md, "Model rollout"): what the
-- candidate version answered on the batches it also ran on, saved by the
-- writer's shadow consumer when the writer saves to PostgreSQL. Never read
-- by users' queries of stock_predictions / query_intents. One row per event
-- and candidate version: a re-delivery adds nothing, another rollout of the
-- same event adds its own row.

CREATE TABLE IF NOT EXISTS stock_predictions_shadow (
    event_id          text         NOT NULL,
    symbol            text         NOT NULL,
    as_of             date         NOT NULL,
    predicted_return  real         NOT NULL,
    confidence        real         NOT NULL,
    model_name        text         NOT NULL,
    model_version     text         NOT NULL,
    cached            boolean      NOT NULL DEFAULT false,
    created_at        timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, model_version)
);

CREATE TABLE IF NOT EXISTS query_intents_shadow (
    event_id       text         NOT NULL,
    query_text     text         NOT NULL,
    label          text         NOT NULL,
    confidence     real         NOT NULL,
    top_labels     jsonb        NOT NULL,
    model_name     text         NOT NULL,
    model_version  text         NOT NULL,
    cached         boolean      NOT NULL DEFAULT false,
    created_at     timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, model_version)
);
