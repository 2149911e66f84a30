use super::*;

fn ok(s: &str) -> Request<'_> {
    match parse(s.as_bytes(), 1 << 16) {
        Ok(r) => r,
        Err(e) => panic!("expected a request from {s}, got {e:?}"),
    }
}
fn error(s: &str) -> RpcError {
    match parse(s.as_bytes(), 1 << 16) {
        Err(Reject::Error(_, e)) => e,
        other => panic!("expected an error reply for {s}, got {other:?}"),
    }
}
fn dropped(s: &str) -> DropReason {
    match parse(s.as_bytes(), 1 << 16) {
        Err(Reject::Drop(r)) => r,
        other => panic!("expected a drop for {s}, got {other:?}"),
    }
}

#[test]
fn parses_a_full_request() {
    let r = ok(
        r#"{"v":2,"id":7,"src":"dev\u0031","dst":"//svc","key":"k","method":"/v1/Auth.GetToken","args":{"host":"h"},"tag":{"x":[1]},"deadline":1.5,"timeout":3,"nr":false,"extra":[1,{"a":2}]}"#,
    );
    assert_eq!(r.to.src, "dev1");
    assert_eq!(r.to.id, 7);
    assert_eq!(r.to.tag.map(RawValue::get), Some(r#"{"x":[1]}"#));
    assert_eq!(r.method.as_deref(), Some("/v1/Auth.GetToken"));
    assert_eq!(r.args.map(RawValue::get), Some(r#"{"host":"h"}"#));
    assert_eq!((r.deadline, r.timeout), (Some(1.5), Some(3.0)));
}

#[test]
fn unanswerable_frames_are_dropped_with_a_reason() {
    assert_eq!(dropped("not json"), DropReason::NotJson);
    assert_eq!(dropped("[1,2]"), DropReason::NotJson);
    assert_eq!(dropped(r#"{"id":1}"#), DropReason::BadSrc);
    assert_eq!(dropped(r#"{"id":1,"src":"a/+"}"#), DropReason::BadSrc);
    assert_eq!(dropped(r#"{"id":1,"src":"$SYS/x"}"#), DropReason::BadSrc);
    assert_eq!(dropped(r#"{"id":1,"src":"a\u0000b"}"#), DropReason::BadSrc);
    assert_eq!(dropped(r#"{"id":1,"src":""}"#), DropReason::BadSrc);
    for nonchar in [r"\ufdd0", r"\ufdef", r"\ufffe", r"\uffff", r"\ud83f\udfff"] {
        let f = format!(r#"{{"id":1,"src":"a{nonchar}"}}"#);
        assert_eq!(dropped(&f), DropReason::BadSrc, "{f}");
    }
    assert!(valid_src("a\u{fdcf}\u{fdf0}\u{fffd}\u{1f600}"));
    assert_eq!(dropped(r#"{"id":1,"src":5}"#), DropReason::BadSrc);
    assert_eq!(dropped(r#"{"src":"a"}"#), DropReason::BadId);
    assert_eq!(dropped(r#"{"src":"a","id":0}"#), DropReason::BadId);
    assert_eq!(
        dropped(r#"{"src":"a","id":9007199254740992}"#),
        DropReason::BadId
    );
    assert_eq!(dropped(r#"{"src":"a","id":1.5}"#), DropReason::BadId);
    assert_eq!(dropped(r#"{"src":"a","id":"1"}"#), DropReason::BadId);
    assert_eq!(
        dropped(r#"{"src":"a","id":1,"src":"b"}"#),
        DropReason::AmbiguousAddress
    );
}

#[test]
fn malformed_fields_get_a_400_naming_the_field() {
    let e = error(r#"{"src":"a","id":1,"v":1}"#);
    assert_eq!((e.code, e.message.as_str()), (400, "v: must be 2"));
    assert!(error(r#"{"src":"a","id":1,"method":5}"#)
        .message
        .starts_with("method:"));
    assert!(error(r#"{"src":"a","id":1,"args":[]}"#)
        .message
        .starts_with("args:"));
    assert!(error(r#"{"src":"a","id":1,"nr":"yes"}"#)
        .message
        .starts_with("nr:"));
    assert!(error(r#"{"src":"a","id":1,"deadline":"x"}"#)
        .message
        .starts_with("deadline:"));
    assert!(error(r#"{"src":"a","id":1,"key":"a","key":"b"}"#)
        .message
        .starts_with("key:"));
}

#[test]
fn oversize_frames_get_413() {
    let big = format!(
        r#"{{"src":"a","id":1,"args":{{"x":"{}"}}}}"#,
        "y".repeat(200)
    );
    match parse(big.as_bytes(), 100) {
        Err(Reject::Error(to, e)) => {
            assert_eq!(e.code, 413);
            assert_eq!((to.src.as_ref(), to.id), ("a", 1));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn responses_have_the_envelope() {
    let r = ok(r#"{"id":5,"src":"me","tag":"t"}"#);
    let out = encode_result("//svc", &r.to, Some(&true));
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{"v":2,"src":"//svc","dst":"me","id":5,"tag":"t","result":true}"#
    );
    let out = encode_result::<()>("//svc", &r.to, None);
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{"v":2,"src":"//svc","dst":"me","id":5,"tag":"t"}"#
    );
    let out = encode_error("//svc", &r.to, &RpcError::no_handler("X"));
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{"v":2,"src":"//svc","dst":"me","id":5,"tag":"t","error":{"code":404,"message":"No handler for X"}}"#
    );
}

#[test]
fn args_errors_name_the_field() {
    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct A {
        host: String,
    }
    let raw = RawValue::from_string(r#"{"host":5}"#.into()).unwrap();
    let e = parse_args::<A>(Some(&raw)).unwrap_err();
    assert!(
        e.message.starts_with("args.host: invalid type"),
        "{}",
        e.message
    );
    let e = parse_args::<A>(None).unwrap_err();
    assert_eq!(e.message, "args: missing field `host`");
}

#[test]
fn response_frames_are_dropped_whatever_else_they_carry() {
    for f in [
        r#"{"id":1,"src":"svc","dst":"a","result":true}"#,
        r#"{"id":1,"src":"svc","result":null}"#,
        r#"{"id":1,"src":"svc","error":{"code":500,"message":"x"}}"#,
        r#"{"id":1,"src":"a","key":"k","method":"Auth.ListToken","error":null}"#,
        // Before the address checks: a response is never answered, address or not.
        r#"{"result":1}"#,
        r#"{"src":"a","src":"b","id":1,"error":1}"#,
    ] {
        assert_eq!(dropped(f), DropReason::ResponseFrame, "{f}");
    }
    // A field merely named like one inside args is not a response.
    ok(r#"{"id":1,"src":"a","args":{"result":1,"error":2}}"#);
}
