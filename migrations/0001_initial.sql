-- authd's PostgreSQL schema, version 1. authd applies the files of this directory in order,
-- at start, under an advisory lock, each in its own transaction, and records each in
-- authd_migrations. A worker refuses a database with a version it does not know.
--
-- The server key never enters the database: PSK hashes are keyed hashes, tokens are found
-- by their id and verified with the key, so a dump of this database yields no token and
-- no PSK.

-- Devices and users that sign in. kind: 0 device, 1 user.
CREATE TABLE entities (
    id          text COLLATE "C" PRIMARY KEY,
    kind        smallint NOT NULL,
    owner       text COLLATE "C",
    psk_key_id  bigint,
    psk_hash    bytea,
    cert_sha256 bytea,
    disabled    boolean NOT NULL,
    created     bigint NOT NULL
);
CREATE INDEX entities_by_owner ON entities (owner, id) WHERE owner IS NOT NULL;

-- The live app token of each (user, host); token_id finds a presented token's owner.
CREATE TABLE tokens (
    user_id  text COLLATE "C" NOT NULL,
    host     text COLLATE "C" NOT NULL,
    token_id bytea NOT NULL UNIQUE,
    key_id   bigint NOT NULL,
    created  bigint NOT NULL,
    PRIMARY KEY (user_id, host)
);

-- Access rules. Ids come from a sequence, so they are never reused. Every change of the
-- rules bumps rules_version (one row: writers of rules queue on it, so versions commit in
-- order) and appends to rule_log, from which each worker brings its in-memory index up to
-- date when a decision's query shows the version moved.
CREATE SEQUENCE rule_ids;
CREATE TABLE rules (
    id   bigint PRIMARY KEY,
    rule jsonb NOT NULL
);
CREATE TABLE rules_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint NOT NULL
);
INSERT INTO rules_version (version) VALUES (0);
-- What each version did: rule rule_id added, or (deleted) removed.
CREATE TABLE rule_log (
    version bigint PRIMARY KEY,
    rule_id bigint NOT NULL,
    rule    jsonb NOT NULL,
    deleted boolean NOT NULL
);

-- The reply of each state-changing request, bound to caller key, method and arguments.
-- id is the request's u64 id, stored as the bigint with the same bits.
CREATE TABLE replays (
    src         text COLLATE "C" NOT NULL,
    id          bigint NOT NULL,
    at_ms       bigint NOT NULL,
    caller      text NOT NULL,
    method      text NOT NULL,
    args_digest bytea NOT NULL,
    reply       jsonb NOT NULL,
    PRIMARY KEY (src, id)
);
CREATE INDEX replays_by_age ON replays (at_ms);

-- Each server key id the workers use, with a check value made with that key (an HMAC of
-- a fixed text: it proves nothing about the key's bytes to a reader). A worker whose key
-- file holds a different key under a recorded id refuses to start: its tokens and PSK
-- hashes would disagree with the other workers'.
CREATE TABLE server_keys (
    key_id      bigint PRIMARY KEY,
    check_value bytea NOT NULL
);

-- Authenticate's brute-force guard, shared by every worker.
CREATE TABLE lockouts (
    id              text COLLATE "C" PRIMARY KEY,
    failures        integer NOT NULL,
    last_failure_ms bigint NOT NULL,
    locked_until_ms bigint NOT NULL
);

-- Applies one change (see authd_apply) and records its reply; returns what it did:
-- {"before": reply} | {"id_reused": true} | {"changed": {...}}.
CREATE FUNCTION authd_apply_one(c jsonb, window_ms bigint) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    rq jsonb := c->'req';
    prior replays%ROWTYPE;
    old entities%ROWTYPE;
    changed jsonb;
    reply jsonb := c->'reply';
    n bigint;
    v bigint;
    rid bigint;
    old_rule jsonb;
BEGIN
    IF rq IS NOT NULL THEN
        SELECT * INTO prior FROM replays WHERE src = rq->>'src' AND id = (rq->>'id')::bigint;
        IF FOUND AND prior.at_ms + window_ms >= (rq->>'at')::bigint THEN
            IF prior.caller = rq->>'caller' AND prior.method = rq->>'method'
               AND prior.args_digest = decode(rq->>'digest', 'base64') THEN
                RETURN jsonb_build_object('before', prior.reply);
            END IF;
            RETURN '{"id_reused": true}';
        END IF;
    END IF;

    CASE c->>'kind'
    WHEN 'replace_token' THEN
        PERFORM 1 FROM tokens WHERE user_id = c->>'user' AND host = c->>'host';
        IF NOT FOUND THEN
            SELECT count(*) INTO n FROM tokens WHERE user_id = c->>'user';
            IF n >= (c->>'max')::bigint THEN
                RETURN jsonb_build_object('changed', jsonb_build_object('too_many_tokens', (c->>'max')::bigint));
            END IF;
        END IF;
        INSERT INTO tokens (user_id, host, token_id, key_id, created)
        VALUES (c->>'user', c->>'host', decode(c->>'token_id', 'base64'), (c->>'key_id')::bigint, (c->>'created')::bigint)
        ON CONFLICT (user_id, host) DO UPDATE
            SET token_id = EXCLUDED.token_id, key_id = EXCLUDED.key_id, created = EXCLUDED.created;
        changed := '{"token_replaced": true}';
    WHEN 'revoke_token' THEN
        DELETE FROM tokens WHERE user_id = c->>'user' AND host = c->>'host';
        GET DIAGNOSTICS n = ROW_COUNT;
        changed := jsonb_build_object('token_revoked', n > 0);
    WHEN 'put_entity' THEN
        SELECT * INTO old FROM entities WHERE id = c->>'id';
        IF FOUND AND (c->>'create_only')::boolean THEN
            RETURN '{"changed": {"exists": true}}';
        END IF;
        n := 0;
        -- The same test as EntityRecord::reprovisions: a new id, any PSK given or dropped,
        -- the pin changed, the kind changed, or disabled: user id's tokens go.
        IF old.id IS NULL OR c->>'psk_hash' IS NOT NULL OR old.psk_hash IS NOT NULL
           OR old.cert_sha256 IS DISTINCT FROM decode(c->>'cert_sha256', 'base64')
           OR old.kind <> (c->>'kind_code')::smallint OR (c->>'disabled')::boolean THEN
            DELETE FROM tokens WHERE user_id = c->>'id';
            GET DIAGNOSTICS n = ROW_COUNT;
        END IF;
        INSERT INTO entities (id, kind, owner, psk_key_id, psk_hash, cert_sha256, disabled, created)
        VALUES (c->>'id', (c->>'kind_code')::smallint, c->>'owner', (c->>'psk_key_id')::bigint,
                decode(c->>'psk_hash', 'base64'), decode(c->>'cert_sha256', 'base64'),
                (c->>'disabled')::boolean, (c->>'created')::bigint)
        ON CONFLICT (id) DO UPDATE
            SET kind = EXCLUDED.kind, owner = EXCLUDED.owner, psk_key_id = EXCLUDED.psk_key_id,
                psk_hash = EXCLUDED.psk_hash, cert_sha256 = EXCLUDED.cert_sha256,
                disabled = EXCLUDED.disabled;
        changed := jsonb_build_object('entity_put', CASE WHEN old.id IS NULL THEN 'created' ELSE 'replaced' END, 'tokens', n);
    WHEN 'delete_entity' THEN
        DELETE FROM entities WHERE id = c->>'id';
        GET DIAGNOSTICS v = ROW_COUNT;
        DELETE FROM tokens WHERE user_id = c->>'id';
        GET DIAGNOSTICS n = ROW_COUNT;
        changed := jsonb_build_object('entity_deleted', v > 0, 'tokens', n);
    WHEN 'add_rule' THEN
        UPDATE rules_version SET version = version + 1 RETURNING version INTO v;
        rid := nextval('rule_ids');
        INSERT INTO rules (id, rule) VALUES (rid, c->'rule');
        INSERT INTO rule_log (version, rule_id, rule, deleted) VALUES (v, rid, c->'rule', false);
        changed := jsonb_build_object('rule_added', rid);
        reply := jsonb_build_object('Value', jsonb_build_object('rule_id', rid));
    WHEN 'delete_rule' THEN
        DELETE FROM rules WHERE id = (c->>'rule_id')::bigint RETURNING rule INTO old_rule;
        IF FOUND THEN
            UPDATE rules_version SET version = version + 1 RETURNING version INTO v;
            INSERT INTO rule_log (version, rule_id, rule, deleted) VALUES (v, (c->>'rule_id')::bigint, old_rule, true);
        END IF;
        changed := jsonb_build_object('rule_deleted', old_rule);
    ELSE
        RAISE EXCEPTION 'authd: unknown change kind %', c->>'kind';
    END CASE;

    IF rq IS NOT NULL THEN
        INSERT INTO replays (src, id, at_ms, caller, method, args_digest, reply)
        VALUES (rq->>'src', (rq->>'id')::bigint, (rq->>'at')::bigint, rq->>'caller',
                rq->>'method', decode(rq->>'digest', 'base64'), reply)
        ON CONFLICT (src, id) DO UPDATE
            SET at_ms = EXCLUDED.at_ms, caller = EXCLUDED.caller, method = EXCLUDED.method,
                args_digest = EXCLUDED.args_digest, reply = EXCLUDED.reply;
    END IF;
    RETURN jsonb_build_object('changed', changed);
END
$$;

-- Applies a batch of changes in one transaction (one round trip, one commit), in order:
-- each sees the ones before it. First it takes every advisory lock the batch names
-- (request keys and subjects, hashed by authd) in ascending order, so that two workers'
-- batches never wait on each other in a cycle and a request, a user's tokens, an entity or
-- the rules are changed by one transaction at a time.
CREATE FUNCTION authd_apply(batch jsonb, locks bigint[], window_ms bigint) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    results jsonb := '[]';
    c jsonb;
    k bigint;
BEGIN
    FOR k IN SELECT DISTINCT unnest(locks) ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(k);
    END LOOP;
    FOR c IN SELECT value FROM jsonb_array_elements(batch) LOOP
        results := results || jsonb_build_array(authd_apply_one(c, window_ms));
    END LOOP;
    RETURN results;
END
$$;
