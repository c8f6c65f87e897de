-- History is stored packed: `features` becomes bytea holding the 105 values as
-- big-endian float32 (4 bytes each, in feature order), the layout of
-- PostgreSQL's own float4send. Sending a real[] costs the server a function
-- call and an allocation per element; the 5,000-stock job reads 15.75 million
-- of them, which made the database the pipeline's largest CPU user. A bytea is
-- sent as it is stored. See docs/decisions.md.
--
-- For loading and inspecting history from SQL:
--   sluice_pack_features(real[])  -> bytea
--   sluice_unpack_features(bytea) -> real[]

CREATE OR REPLACE FUNCTION sluice_pack_features(feature_values real[]) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT coalesce(string_agg(float4send(v), ''::bytea ORDER BY i), ''::bytea)
      FROM unnest(feature_values) WITH ORDINALITY AS u(v, i) $$;

CREATE OR REPLACE FUNCTION sluice_unpack_features(packed bytea) RETURNS real[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    -- float8 arithmetic is exact for every float32: sign * mantissa * 2^exponent.
    SELECT coalesce(array_agg(
        (CASE WHEN bits >> 31 = 1 THEN -1.0::float8 ELSE 1.0::float8 END) * CASE (bits >> 23) & 255
            WHEN 0 THEN (bits & 8388607)::float8 * 2.0::float8 ^ -149
            WHEN 255 THEN CASE WHEN bits & 8388607 = 0 THEN 'Infinity'::float8 ELSE 'NaN'::float8 END
            ELSE ((bits & 8388607) + 8388608)::float8 * 2.0::float8 ^ (((bits >> 23) & 255) - 150)
        END ORDER BY i)::real[], '{}')
    FROM (
        SELECT i, (get_byte(packed, i)::bigint << 24) | (get_byte(packed, i + 1) << 16)
                  | (get_byte(packed, i + 2) << 8) | get_byte(packed, i + 3) AS bits
        FROM generate_series(0, length(packed) - 4, 4) AS i
    ) AS words
$$;

ALTER TABLE features ALTER COLUMN features TYPE bytea USING sluice_pack_features(features);
ALTER TABLE features ADD CONSTRAINT features_whole_floats CHECK (length(features) % 4 = 0);
