-- authd's PostgreSQL schema, version 2: app token lifetimes and change events.

-- UNIX seconds from which a token no longer signs in; NULL: never. The pruner finds the
-- expired ones by this index.
ALTER TABLE tokens ADD COLUMN expires bigint;
CREATE INDEX tokens_by_expiry ON tokens (expires) WHERE expires IS NOT NULL;

-- The change events (the outbox): written by authd_apply in the transaction of the change
-- that made them. Numbers come from event_seq, one row that every transaction with events
-- updates just before it commits: a transaction holds the row until its COMMIT, so numbers
-- are given in commit order, without gaps (a rolled-back transaction gives its back).
CREATE TABLE events (
    seq   bigint PRIMARY KEY,
    at_ms bigint NOT NULL,
    body  text NOT NULL
);
CREATE TABLE event_seq (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq bigint NOT NULL
);
INSERT INTO event_seq (seq) VALUES (0);
-- sent: every event up to it was acknowledged by the broker (the publisher moves it);
-- pruned: every event up to it is gone (Events.Since answers 410 below it).
CREATE TABLE event_marks (
    one    boolean PRIMARY KEY DEFAULT true CHECK (one),
    sent   bigint NOT NULL,
    pruned bigint NOT NULL
);
INSERT INTO event_marks (sent, pruned) VALUES (0, 0);

-- Applies one change (see authd_apply) and records its reply; returns what it did:
-- {"before": reply} | {"id_reused": true} | {"changed": {...}, "events": [body, ...]},
-- the events being what the change ended (the same rules as EventBody::of and
-- Ended::of_put in authd's code), without their numbers.
CREATE OR REPLACE FUNCTION authd_apply_one(c jsonb, window_ms bigint) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    rq jsonb := c->'req';
    prior replays%ROWTYPE;
    old entities%ROWTYPE;
    changed jsonb;
    events jsonb := '[]';
    reply jsonb := c->'reply';
    n bigint;
    v bigint;
    rid bigint;
    old_rule jsonb;
    ended text;
    creds boolean;
    t jsonb;
    pairs jsonb;
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
        IF FOUND THEN
            events := jsonb_build_array(jsonb_build_object('type', 'token.replaced', 'user', c->>'user', 'host', c->>'host'));
        ELSE
            SELECT count(*) INTO n FROM tokens WHERE user_id = c->>'user';
            IF n >= (c->>'max')::bigint THEN
                RETURN jsonb_build_object('changed', jsonb_build_object('too_many_tokens', (c->>'max')::bigint));
            END IF;
        END IF;
        INSERT INTO tokens (user_id, host, token_id, key_id, created, expires)
        VALUES (c->>'user', c->>'host', decode(c->>'token_id', 'base64'), (c->>'key_id')::bigint,
                (c->>'created')::bigint, (c->>'expires')::bigint)
        ON CONFLICT (user_id, host) DO UPDATE
            SET token_id = EXCLUDED.token_id, key_id = EXCLUDED.key_id, created = EXCLUDED.created,
                expires = EXCLUDED.expires;
        changed := jsonb_build_object('token_replaced', jsonb_array_length(events) > 0);
    WHEN 'revoke_token' THEN
        DELETE FROM tokens WHERE user_id = c->>'user' AND host = c->>'host';
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            events := jsonb_build_array(jsonb_build_object('type', 'token.revoked', 'user', c->>'user', 'host', c->>'host'));
        END IF;
        changed := jsonb_build_object('token_revoked', n > 0);
    WHEN 'put_entity' THEN
        SELECT * INTO old FROM entities WHERE id = c->>'id';
        IF FOUND AND (c->>'create_only')::boolean THEN
            RETURN '{"changed": {"exists": true}}';
        END IF;
        n := 0;
        -- EntityRecord::changes_credentials: any PSK given or dropped, the pin changed,
        -- the kind changed.
        creds := old.id IS NOT NULL AND (c->>'psk_hash' IS NOT NULL OR old.psk_hash IS NOT NULL
           OR old.cert_sha256 IS DISTINCT FROM decode(c->>'cert_sha256', 'base64')
           OR old.kind <> (c->>'kind_code')::smallint);
        -- EntityRecord::reprovisions: a new id, new credentials, or disabled: user id's
        -- tokens go.
        IF old.id IS NULL OR creds OR (c->>'disabled')::boolean THEN
            DELETE FROM tokens WHERE user_id = c->>'id';
            GET DIAGNOSTICS n = ROW_COUNT;
        END IF;
        -- Ended::of_put.
        IF old.id IS NULL THEN
            IF n > 0 THEN
                ended := CASE WHEN (c->>'disabled')::boolean THEN 'disabled' ELSE 'credentials_changed' END;
            END IF;
        ELSIF (c->>'disabled')::boolean AND NOT old.disabled THEN
            ended := 'disabled';
        ELSIF creds THEN
            ended := 'credentials_changed';
        ELSIF old.owner IS DISTINCT FROM c->>'owner' THEN
            ended := 'owner_changed';
        ELSIF n > 0 THEN
            ended := 'credentials_changed';
        END IF;
        IF ended IS NOT NULL THEN
            events := jsonb_build_array(jsonb_build_object('type', 'entity.' || ended, 'id', c->>'id'));
        END IF;
        INSERT INTO entities (id, kind, owner, psk_key_id, psk_hash, cert_sha256, disabled, created)
        VALUES (c->>'id', (c->>'kind_code')::smallint, c->>'owner', (c->>'psk_key_id')::bigint,
                decode(c->>'psk_hash', 'base64'), decode(c->>'cert_sha256', 'base64'),
                (c->>'disabled')::boolean, (c->>'created')::bigint)
        ON CONFLICT (id) DO UPDATE
            SET kind = EXCLUDED.kind, owner = EXCLUDED.owner, psk_key_id = EXCLUDED.psk_key_id,
                psk_hash = EXCLUDED.psk_hash, cert_sha256 = EXCLUDED.cert_sha256,
                disabled = EXCLUDED.disabled;
        changed := jsonb_build_object('entity_put', CASE WHEN old.id IS NULL THEN 'created' ELSE 'replaced' END,
                                      'tokens', n, 'ended', ended);
    WHEN 'delete_entity' THEN
        DELETE FROM entities WHERE id = c->>'id';
        GET DIAGNOSTICS v = ROW_COUNT;
        DELETE FROM tokens WHERE user_id = c->>'id';
        GET DIAGNOSTICS n = ROW_COUNT;
        IF v > 0 OR n > 0 THEN
            events := jsonb_build_array(jsonb_build_object('type', 'entity.deleted', 'id', c->>'id'));
        END IF;
        changed := jsonb_build_object('entity_deleted', v > 0, 'tokens', n);
    WHEN 'add_rule' THEN
        UPDATE rules_version SET version = version + 1 RETURNING version INTO v;
        rid := nextval('rule_ids');
        INSERT INTO rules (id, rule) VALUES (rid, c->'rule');
        INSERT INTO rule_log (version, rule_id, rule, deleted) VALUES (v, rid, c->'rule', false);
        events := jsonb_build_array(jsonb_build_object('type', 'rule.added', 'rule_id', rid) || (c->'rule'));
        changed := jsonb_build_object('rule_added', rid);
        reply := jsonb_build_object('Value', jsonb_build_object('rule_id', rid));
    WHEN 'delete_rule' THEN
        DELETE FROM rules WHERE id = (c->>'rule_id')::bigint RETURNING rule INTO old_rule;
        IF FOUND THEN
            UPDATE rules_version SET version = version + 1 RETURNING version INTO v;
            INSERT INTO rule_log (version, rule_id, rule, deleted) VALUES (v, (c->>'rule_id')::bigint, old_rule, true);
            events := jsonb_build_array(jsonb_build_object('type', 'rule.deleted', 'rule_id', (c->>'rule_id')::bigint) || old_rule);
        END IF;
        changed := jsonb_build_object('rule_deleted', old_rule);
    WHEN 'expire_tokens' THEN
        -- Each listed token that is still its pair's live token and has expired.
        pairs := '[]';
        FOR t IN SELECT value FROM jsonb_array_elements(c->'tokens') LOOP
            DELETE FROM tokens WHERE user_id = t->>'user' AND host = t->>'host'
                AND token_id = decode(t->>'token_id', 'base64') AND expires <= (c->>'now')::bigint;
            IF FOUND THEN
                pairs := pairs || jsonb_build_array(jsonb_build_array(t->>'user', t->>'host'));
                events := events || jsonb_build_array(jsonb_build_object('type', 'token.expired', 'user', t->>'user', 'host', t->>'host'));
            END IF;
        END LOOP;
        changed := jsonb_build_object('tokens_expired', pairs);
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
    IF NOT coalesce((c->>'events')::boolean, false) THEN
        events := '[]';
    END IF;
    RETURN jsonb_build_object('changed', changed, 'events', events);
END
$$;

-- Applies a batch of changes in one transaction (one round trip, one commit), in order:
-- each sees the ones before it. First it takes every advisory lock the batch names
-- (request keys and subjects, hashed by authd) in ascending order, so that two workers'
-- batches never wait on each other in a cycle and a request, a user's tokens, an entity or
-- the rules are changed by one transaction at a time. Last, it numbers the batch's events
-- (event_seq, held from here to COMMIT: numbers in commit order) and writes them.
CREATE OR REPLACE FUNCTION authd_apply(batch jsonb, locks bigint[], window_ms bigint) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    results jsonb := '[]';
    pending jsonb := '[]';
    c jsonb;
    r jsonb;
    e jsonb;
    k bigint;
    last bigint;
BEGIN
    FOR k IN SELECT DISTINCT unnest(locks) ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(k);
    END LOOP;
    FOR c IN SELECT value FROM jsonb_array_elements(batch) LOOP
        r := authd_apply_one(c, window_ms);
        FOR e IN SELECT value FROM jsonb_array_elements(coalesce(r->'events', '[]')) LOOP
            pending := pending || jsonb_build_array(jsonb_build_object('at', (c->>'at')::bigint, 'body', e));
        END LOOP;
        results := results || jsonb_build_array(r - 'events');
    END LOOP;
    IF jsonb_array_length(pending) > 0 THEN
        UPDATE event_seq SET seq = seq + jsonb_array_length(pending) RETURNING seq INTO last;
        INSERT INTO events (seq, at_ms, body)
        SELECT last - jsonb_array_length(pending) + p.n,
               (p.e->>'at')::bigint,
               (jsonb_build_object('v', 1, 'seq', last - jsonb_array_length(pending) + p.n,
                                   'at', (p.e->>'at')::bigint) || (p.e->'body'))::text
        FROM jsonb_array_elements(pending) WITH ORDINALITY AS p(e, n);
    END IF;
    RETURN results;
END
$$;
