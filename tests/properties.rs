//! Properties of the wire format and of tokens, over generated inputs: the parser never
//! panics and never accepts what it must not; a valid request parses back to what was
//! sent; no unsafe `src` ever becomes a reply topic; tokens round-trip and any one-character
//! change breaks them.

use authd::config::Config;
use authd::crypto::{parse_token, ServerKeys, TokenId};
use authd::frame::{self, DropReason, Reject, MAX_ID};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{json, Map, Value};

const FIELDS: &[&str] = &[
    "v", "id", "src", "dst", "key", "method", "args", "tag", "deadline", "timeout", "nr",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects shaped like frames: mostly envelope field names, any values.
fn frame_like() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        4 => select(FIELDS).prop_map(str::to_owned),
        1 => any::<String>(),
    ];
    prop::collection::btree_map(key, json_value(), 0..12)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// Strings that are safe as `src`: printable, no wildcard, not starting with `$`.
fn good_src() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_./:@é日-][a-zA-Z0-9_./:@é日$ -]{0,60}"
}

/// A character that makes a `src` unsafe wherever it appears.
fn forbidden_char() -> impl Strategy<Value = char> {
    prop_oneof![
        Just('+'),
        Just('#'),
        Just('\0'),
        (0x01u32..0x20).prop_map(|c| char::from_u32(c).unwrap()),
        (0x7fu32..0xa0).prop_map(|c| char::from_u32(c).unwrap()),
        (0xfdd0u32..=0xfdef).prop_map(|c| char::from_u32(c).unwrap()),
        (0u32..=16).prop_map(|plane| char::from_u32(plane * 0x10000 + 0xfffe).unwrap()),
        (0u32..=16).prop_map(|plane| char::from_u32(plane * 0x10000 + 0xffff).unwrap()),
    ]
}

fn frame_with_src(src: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": 1, "src": src, "method": "Auth.ListToken"})).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parse_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = frame::parse(&bytes, 256);
    }

    #[test]
    fn parse_never_panics_on_json_and_keeps_its_promises(v in prop_oneof![json_value(), frame_like()]) {
        let bytes = serde_json::to_vec(&v).unwrap();
        for limit in [16, 1 << 20] {
            match frame::parse(&bytes, limit) {
                Ok(r) => {
                    prop_assert!(frame::valid_src(&r.to.src));
                    prop_assert!((1..=MAX_ID).contains(&r.to.id));
                    prop_assert!(bytes.len() <= limit);
                    if let Some(args) = r.args {
                        let is_object = args.get().starts_with('{');
                        prop_assert!(is_object);
                    }
                }
                Err(Reject::Error(to, e)) => {
                    prop_assert!(frame::valid_src(&to.src));
                    prop_assert!((1..=MAX_ID).contains(&to.id));
                    prop_assert!(e.code == 400 || e.code == 413, "{e}");
                }
                Err(Reject::Drop(_)) => {}
            }
        }
    }

    #[test]
    fn a_valid_request_parses_back_to_its_fields(
        src in good_src(),
        id in 1..=MAX_ID,
        dst in proptest::option::of(any::<String>()),
        key in proptest::option::of(any::<String>()),
        method in proptest::option::of(any::<String>()),
        args in proptest::option::of(prop::collection::btree_map(any::<String>(), json_value(), 0..5)),
        tag in proptest::option::of(json_value()),
        deadline in proptest::option::of(-1e12f64..1e12),
        timeout in proptest::option::of(-1e6f64..1e6),
        nr in proptest::option::of(any::<bool>()),
        v in proptest::option::of(Just(2)),
    ) {
        let mut f = Map::new();
        f.insert("src".into(), json!(src));
        f.insert("id".into(), json!(id));
        let optional = [
            ("v", v.map(Value::from)),
            ("dst", dst.clone().map(Value::from)),
            ("key", key.clone().map(Value::from)),
            ("method", method.clone().map(Value::from)),
            ("args", args.clone().map(|a| Value::Object(a.into_iter().collect()))),
            ("tag", tag.clone()),
            ("deadline", deadline.map(Value::from)),
            ("timeout", timeout.map(Value::from)),
            ("nr", nr.map(Value::from)),
        ];
        for (k, value) in optional {
            if let Some(value) = value {
                f.insert(k.into(), value);
            }
        }
        let bytes = serde_json::to_vec(&Value::Object(f)).unwrap();
        let r = match frame::parse(&bytes, 1 << 20) {
            Ok(r) => r,
            Err(e) => return Err(TestCaseError::fail(format!("{e:?}"))),
        };
        prop_assert_eq!(r.to.src.as_ref(), src.as_str());
        prop_assert_eq!(r.to.id, id);
        prop_assert_eq!(r.to.nr, nr.unwrap_or(false));
        prop_assert_eq!(r.dst.as_deref(), dst.as_deref());
        prop_assert_eq!(r.key.as_deref(), key.as_deref());
        prop_assert_eq!(r.method.as_deref(), method.as_deref());
        // Arguments and tag are kept as the exact text sent.
        let args_text = args.map(|a| serde_json::to_string(&a).unwrap());
        prop_assert_eq!(r.args.map(|a| a.get().to_owned()), args_text);
        // `"tag": null` is a tag, copied as `null`.
        let tag_text = tag.map(|t| serde_json::to_string(&t).unwrap());
        prop_assert_eq!(r.to.tag.map(|t| t.get().to_owned()), tag_text);
        // serde_json's fast float parsing may be one ULP off: far below a nanosecond.
        for (got, sent) in [(r.deadline, deadline), (r.timeout, timeout)] {
            prop_assert_eq!(got.is_some(), sent.is_some());
            if let (Some(got), Some(sent)) = (got, sent) {
                prop_assert!((got - sent).abs() <= sent.abs() * 4.0 * f64::EPSILON, "{} vs {}", got, sent);
            }
        }
    }

    #[test]
    fn accepted_srcs_are_safe_topic_levels(src in any::<String>()) {
        if frame::valid_src(&src) {
            prop_assert!(!src.is_empty() && src.len() <= 256);
            prop_assert!(!src.starts_with('$'));
            prop_assert!(!src.contains(['+', '#']));
            prop_assert!(!src.chars().any(char::is_control));
            let topic = Config::default().reply_topic(&src);
            prop_assert_eq!(topic, format!("{src}/rpc"));
        }
    }

    #[test]
    fn an_unsafe_src_is_never_accepted(
        prefix in "[a-z]{0,8}",
        bad in forbidden_char(),
        suffix in "[a-z]{0,8}",
    ) {
        let src = format!("{prefix}{bad}{suffix}");
        prop_assert!(!frame::valid_src(&src), "{:?}", src);
        prop_assert!(matches!(
            frame::parse(&frame_with_src(&src), 1 << 16),
            Err(Reject::Drop(DropReason::BadSrc))
        ));
    }

    #[test]
    fn a_dollar_or_oversized_src_is_never_accepted(rest in good_src(), n in 257usize..600) {
        for src in [format!("${rest}"), "a".repeat(n), format!("{rest}{}", "é".repeat(129))] {
            prop_assert!(!frame::valid_src(&src), "{:?}", src);
            prop_assert!(matches!(
                frame::parse(&frame_with_src(&src), 1 << 16),
                Err(Reject::Drop(DropReason::BadSrc))
            ));
        }
    }

    #[test]
    fn tokens_round_trip(token_id in any::<TokenId>(), user in any::<String>(), host in any::<String>()) {
        let keys = ServerKeys::for_tests();
        let token = keys.token(keys.newest(), &token_id, &user, &host).unwrap();
        prop_assert!(token.starts_with(authd::crypto::TOKEN_PREFIX));
        let parsed = parse_token(&token).expect("our own token parses");
        prop_assert_eq!(parsed.token_id, token_id);
        prop_assert_eq!(parsed.key_id, keys.newest());
        prop_assert!(keys.verify_token(&parsed, &user, &host));
    }

    /// A token has one spelling: whatever the key id is written as, it parses only in the
    /// form the worker writes (decimal, no sign, no leading zero), and any string that
    /// parses is exactly the token its parts make.
    #[test]
    fn only_canonical_token_strings_parse(
        token_id in any::<TokenId>(),
        key_id in prop_oneof![
            "[0-9]{1,12}",
            "0{1,4}[1-9][0-9]{0,3}",
            "[+-]?0*[0-9]{1,4}",
            any::<String>(),
        ],
    ) {
        let keys = ServerKeys::for_tests();
        let genuine = keys.token(keys.newest(), &token_id, "alice", "app").unwrap();
        let tail = genuine.split_once('.').unwrap().1;
        let presented = format!("{}{key_id}.{tail}", authd::crypto::TOKEN_PREFIX);
        let canonical = key_id
            .parse::<u32>()
            .ok()
            .filter(|n| n.to_string() == key_id);
        match parse_token(&presented) {
            Some(parsed) => {
                prop_assert_eq!(Some(parsed.key_id), canonical, "{} parsed", presented);
                let rebuilt = format!(
                    "{}{}.{tail}",
                    authd::crypto::TOKEN_PREFIX,
                    parsed.key_id
                );
                prop_assert_eq!(rebuilt, presented);
            }
            None => prop_assert!(canonical.is_none(), "{} refused", presented),
        }
    }

    #[test]
    fn any_one_character_change_breaks_a_token(
        token_id in any::<TokenId>(),
        user in "[a-z]{1,12}",
        host in "[a-z.]{1,20}",
        at in any::<prop::sample::Index>(),
        replacement in prop_oneof![
            select("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/".chars().collect::<Vec<_>>()),
            any::<char>(),
        ],
    ) {
        let keys = ServerKeys::for_tests();
        let token = keys.token(keys.newest(), &token_id, &user, &host).unwrap();
        let chars: Vec<char> = token.chars().collect();
        let i = at.index(chars.len());
        prop_assume!(chars[i] != replacement);
        let mut mutated = chars.clone();
        mutated[i] = replacement;
        let mutated: String = mutated.into_iter().collect();
        if let Some(parsed) = parse_token(&mutated) {
            prop_assert!(
                !keys.verify_token(&parsed, &user, &host),
                "{} still verifies", mutated
            );
        }
    }
}
