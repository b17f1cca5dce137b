//! infra/template.yaml against the code: every variable the functions read is
//! set, the IAM grants are exactly the permissions AWS documents for the calls
//! the code makes (observed by running every path of the functions, each call
//! recorded as it was made), the rule's SQL selects exactly the fields
//! `iot-fanout` reads, the routes are the ones `ws-handler` handles; and the
//! deployment itself holds up on a real account: the stage waits for the
//! account's logging role, that role outlives the stack, the fan-out's
//! concurrency is bounded and alarms watch its dead letters and throttled posts.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use bridge::permissions::Permissions;
use lambdas::calls::{iam_permissions, Calls, Permission, Resource};
use lambdas::config::{AuthorizerConfig, FanoutConfig, HandlerConfig};
use serde_yaml::Value as Y;
use support::*;

/// A value without its CloudFormation tag (`!Ref`, `!Sub`, `!GetAtt`, ...).
fn untag(v: &Y) -> (Option<String>, &Y) {
    match v {
        Y::Tagged(t) => (Some(t.tag.to_string()), &t.value),
        other => (None, other),
    }
}

fn resource<'a>(t: &'a Y, name: &str) -> &'a Y {
    let r = &t["Resources"][name];
    assert!(!r.is_null(), "the template has no resource {name}");
    r
}

/// (logical id, binary name, variables it reads)
fn functions() -> Vec<(&'static str, &'static str, &'static [&'static str])> {
    vec![
        ("HandlerFunction", "ws-handler", HandlerConfig::VARS),
        (
            "AuthorizerFunction",
            "ws-authorizer",
            AuthorizerConfig::VARS,
        ),
        ("FanoutFunction", "iot-fanout", FanoutConfig::VARS),
    ]
}

#[test]
fn every_variable_the_functions_read_is_set() {
    let t = template();
    for (logical, _, vars) in functions() {
        let set = &resource(&t, logical)["Properties"]["Environment"]["Variables"];
        let names: BTreeSet<&str> = set
            .as_mapping()
            .unwrap()
            .keys()
            .filter_map(|k| k.as_str())
            .collect();
        for var in vars {
            assert!(names.contains(var), "{logical} does not set {var}");
        }
        // ws-handler verifies tokens too (the `auth` action), with the authorizer's settings.
        let also: &[&str] = if logical == "HandlerFunction" {
            AuthorizerConfig::VARS
        } else {
            &[]
        };
        for name in &names {
            assert!(
                vars.contains(name) || also.contains(name) || name.starts_with("AWS_ENDPOINT_URL_"),
                "{logical} sets {name}, which nothing reads"
            );
        }
    }
    // The handler checks tokens exactly as the authorizer does: the same
    // variables, from the same parameters.
    let vars = |f: &str| resource(&t, f)["Properties"]["Environment"]["Variables"].clone();
    let (handler, authorizer) = (vars("HandlerFunction"), vars("AuthorizerFunction"));
    for var in AuthorizerConfig::VARS {
        assert!(
            !authorizer[var].is_null(),
            "the authorizer does not set {var}"
        );
        assert_eq!(
            handler[var], authorizer[var],
            "ws-handler's {var} differs from ws-authorizer's"
        );
    }
    // The handler publishes through this account's IoT data endpoint.
    let h = &resource(&t, "HandlerFunction")["Properties"]["Environment"]["Variables"];
    let (tag, v) = untag(&h["AWS_ENDPOINT_URL_IOT_DATA_PLANE"]);
    assert_eq!(
        (tag.as_deref(), v.as_str()),
        (Some("!Sub"), Some("https://${IotDataEndpoint}"))
    );
    // The management endpoint is the stage's execute-api URL, never a custom domain.
    for f in ["HandlerFunction", "FanoutFunction"] {
        let (_, v) =
            untag(&resource(&t, f)["Properties"]["Environment"]["Variables"]["WEBSOCKET_ENDPOINT"]);
        assert_eq!(
            v.as_str(),
            Some(
                "https://${WebSocketApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}/${StageName}"
            )
        );
    }
}

#[test]
fn functions_are_the_binaries_on_provided_al2023() {
    let t = template();
    assert_eq!(
        t["Parameters"]["Architecture"]["Default"].as_str(),
        Some("arm64")
    );
    for (logical, bin, _) in functions() {
        let p = &resource(&t, logical)["Properties"];
        assert_eq!(p["Runtime"].as_str(), Some("provided.al2023"), "{logical}");
        assert_eq!(p["Handler"].as_str(), Some("bootstrap"));
        assert_eq!(
            p["CodeUri"].as_str(),
            Some(format!("build/{bin}/").as_str())
        );
        let (tag, arch) = untag(&p["Architectures"][0]);
        assert_eq!(
            (tag.as_deref(), arch.as_str()),
            (Some("!Ref"), Some("Architecture"))
        );
        let (_, group) = untag(&p["LoggingConfig"]["LogGroup"]);
        let group = resource(&t, group.as_str().unwrap());
        let (_, retention) = untag(&group["Properties"]["RetentionInDays"]);
        assert_eq!(retention.as_str(), Some("LogRetentionDays"));
        assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("src/bin/{bin}.rs"))
            .exists());
    }
}

#[test]
fn the_table_is_on_demand_with_ttl_recovery_and_encryption() {
    let t = template();
    let p = &resource(&t, "ConnectionsTable")["Properties"];
    assert_eq!(p["BillingMode"].as_str(), Some("PAY_PER_REQUEST"));
    assert_eq!(
        p["TimeToLiveSpecification"]["AttributeName"].as_str(),
        Some("ttl")
    );
    assert_eq!(
        p["TimeToLiveSpecification"]["Enabled"].as_bool(),
        Some(true)
    );
    assert_eq!(
        p["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"].as_bool(),
        Some(true)
    );
    assert_eq!(p["SSESpecification"]["SSEEnabled"].as_bool(), Some(true));
}

/// Splits a SELECT list on the commas outside parentheses.
fn top_level_fields(select: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in select.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(select[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(select[start..].trim());
    out
}

#[test]
fn the_rule_selects_exactly_what_the_fanout_reads() {
    let t = template();
    let rule = &resource(&t, "FanoutRule")["Properties"]["TopicRulePayload"];
    assert_eq!(rule["AwsIotSqlVersion"].as_str(), Some("2016-03-23"));
    let (_, sql) = untag(&rule["Sql"]);
    let sql = sql.as_str().unwrap();
    let select = sql
        .strip_prefix("SELECT ")
        .and_then(|s| s.split(" FROM ").next())
        .expect("SELECT ... FROM ...");
    let fields: BTreeMap<&str, &str> = top_level_fields(select)
        .into_iter()
        .map(|f| {
            let (expr, alias) = f.rsplit_once(" AS ").expect("every field is aliased");
            (alias.trim(), expr.trim())
        })
        .collect();
    assert_eq!(
        fields.keys().copied().collect::<BTreeSet<_>>(),
        lambdas::fanout::RULE_FIELDS
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(fields["topic"], "topic()");
    assert_eq!(fields["payload"], "encode(*, 'base64')");
    assert_eq!(fields["timestamp"], "timestamp()");
    assert_eq!(fields["id"], "newuuid()");
    assert!(sql.ends_with(" FROM '${TopicFilter}'"), "{sql}");
    let (_, target) = untag(&rule["Actions"][0]["Lambda"]["FunctionArn"]);
    assert_eq!(target.as_str(), Some("FanoutFunction.Arn"));
    assert!(
        !rule["ErrorAction"].is_null(),
        "the rule has an error action"
    );
    let perm = &resource(&t, "FanoutInvokePermission")["Properties"];
    assert_eq!(perm["Principal"].as_str(), Some("iot.amazonaws.com"));
}

#[tokio::test]
async fn the_routes_are_the_ones_the_handler_handles() {
    let t = template();
    let api = &resource(&t, "WebSocketApi")["Properties"];
    assert_eq!(api["ProtocolType"].as_str(), Some("WEBSOCKET"));
    assert_eq!(
        api["RouteSelectionExpression"].as_str(),
        Some("$request.body.action")
    );
    let mut routes = BTreeMap::new();
    for (name, r) in t["Resources"].as_mapping().unwrap() {
        if r["Type"].as_str() == Some("AWS::ApiGatewayV2::Route") {
            let p = &r["Properties"];
            let (_, target) = untag(&p["Target"]);
            assert_eq!(target.as_str(), Some("integrations/${HandlerIntegration}"));
            routes.insert(
                p["RouteKey"].as_str().unwrap().to_string(),
                (name.as_str().unwrap(), p.clone()),
            );
        }
    }
    assert_eq!(
        routes.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["$connect", "$default", "$disconnect"]
    );
    // $connect sits behind the REQUEST authorizer (unless auth is off).
    let (tag, v) = untag(&routes["$connect"].1["AuthorizationType"]);
    assert_eq!(tag.as_deref(), Some("!If"));
    assert_eq!(v[1].as_str(), Some("CUSTOM"));
    let auth = &resource(&t, "ConnectAuthorizer")["Properties"];
    assert_eq!(auth["AuthorizerType"].as_str(), Some("REQUEST"));
    // $default answers through a route response (acks, pongs, errors).
    assert_eq!(
        routes["$default"].1["RouteResponseSelectionExpression"].as_str(),
        Some("$default")
    );
    let rr = &resource(&t, "DefaultRouteResponse")["Properties"];
    let (_, route_id) = untag(&rr["RouteId"]);
    assert_eq!(route_id.as_str(), Some(routes["$default"].0));
    // The handler answers each of them (and nothing else is routed to it).
    let kit = Kit::new().await;
    let h = kit.handler(&[("BRIDGE_AUTH", "off")]);
    for route in routes.keys() {
        let r = handle(
            &h,
            ws_event(route, "r1", Some(r#"{"action":"ping"}"#), None),
        )
        .await;
        assert_eq!(r.status_code, 200, "{route}");
    }
    let stage = &resource(&t, "Stage")["Properties"];
    assert!(!stage["DefaultRouteSettings"]["ThrottlingRateLimit"].is_null());
    assert!(!stage["AccessLogSettings"]["DestinationArn"].is_null());
    let (_, url) = untag(&t["Outputs"]["WebSocketUrl"]["Value"]);
    assert!(url
        .as_str()
        .unwrap()
        .starts_with("wss://${WebSocketApi}.execute-api."));
}

/// A statement's resource: every value it can take (both branches of an
/// `!If`), each as written (`*`, `!GetAtt X.Arn`, or the `!Sub` string).
fn resource_alternatives(r: &Y) -> Vec<String> {
    match untag(r) {
        (Some(tag), Y::Sequence(branches)) if tag == "!If" => branches[1..]
            .iter()
            .flat_map(resource_alternatives)
            .collect(),
        (Some(tag), v) if tag == "!GetAtt" => vec![format!("!GetAtt {}", v.as_str().unwrap())],
        (Some(tag), v) if tag == "!Sub" => vec![v.as_str().unwrap().to_string()],
        (None, Y::String(v)) => vec![v.clone()],
        other => panic!("a resource the test cannot read: {other:?}"),
    }
}

/// (action, resource alternatives) of every statement of a function's role:
/// its inline policies and the `AWS::IAM::Policy` resources attached to it.
fn granted(t: &Y, function: &str) -> Vec<(String, Vec<String>)> {
    let (_, role) = untag(&resource(t, function)["Properties"]["Role"]);
    let role = role.as_str().unwrap().trim_end_matches(".Arn");
    let mut documents: Vec<&Y> = resource(t, role)["Properties"]["Policies"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| &p["PolicyDocument"])
        .collect();
    for (_, r) in t["Resources"].as_mapping().unwrap() {
        let attached = r["Type"].as_str() == Some("AWS::IAM::Policy")
            && r["Properties"]["Roles"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|x| untag(x).1.as_str() == Some(role));
        if attached {
            documents.push(&r["Properties"]["PolicyDocument"]);
        }
    }
    let mut out = Vec::new();
    for document in documents {
        for st in document["Statement"].as_sequence().unwrap() {
            assert_eq!(st["Effect"].as_str(), Some("Allow"));
            let actions: Vec<String> = match &st["Action"] {
                Y::Sequence(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
                a => vec![a.as_str().unwrap().to_string()],
            };
            let resources: Vec<Vec<String>> = match &st["Resource"] {
                Y::Sequence(r) => r.iter().map(resource_alternatives).collect(),
                r => vec![resource_alternatives(r)],
            };
            for a in actions {
                for r in &resources {
                    out.push((a.clone(), r.clone()));
                }
            }
        }
    }
    out
}

const ARN: &str = "arn:${AWS::Partition}";
const ACCOUNT: &str = "${AWS::Region}:${AWS::AccountId}";

/// Whether a granted resource (every alternative of it) is the kind of
/// resource a permission of `function` names, scoped to this stack.
fn covers(function: &str, alternatives: &[String], wanted: &Resource) -> bool {
    alternatives.iter().all(|r| match wanted {
        Resource::Table => r == "!GetAtt ConnectionsTable.Arn",
        Resource::Function => r == &format!("!GetAtt {function}.Arn"),
        Resource::Topic => {
            r == &format!("{ARN}:iot:{ACCOUNT}:topic/*")
                || r == &format!("{ARN}:iot:{ACCOUNT}:topic/${{TopicPrefix}}/*")
        }
        Resource::Connection { method } => {
            r == &format!(
            "{ARN}:execute-api:{ACCOUNT}:${{WebSocketApi}}/${{StageName}}/{method}/@connections/*"
        )
        }
        Resource::Any => r == "*",
        Resource::Unknown => false,
    })
}

fn needed(calls: &Calls) -> BTreeSet<Permission> {
    calls.kinds().iter().flat_map(iam_permissions).collect()
}

/// Compares a role's grants with the permissions its function's calls need:
/// every need covered, every grant needed (logs and the dead-letter queue
/// aside: the runtime uses those, not the code).
fn check_grants(t: &Y, function: &str, needed: &BTreeSet<Permission>) {
    let granted = granted(t, function);
    for p in needed {
        assert!(
            granted
                .iter()
                .any(|(a, r)| a == &p.action && covers(function, r, &p.resource)),
            "{function} calls need {} on {:?}, which its role does not grant",
            p.action,
            p.resource
        );
    }
    for (action, r) in &granted {
        if action.starts_with("logs:") || action.starts_with("sqs:") {
            continue;
        }
        assert!(
            needed
                .iter()
                .any(|p| &p.action == action && covers(function, r, &p.resource)),
            "{function} is granted {action} on {r:?}, which no call it makes needs"
        );
        if r.iter().any(|x| x == "*") {
            assert_eq!(
                action, "iot:ListRetainedMessages",
                "{function}: {action} on *"
            );
        }
    }
}

#[tokio::test]
async fn iam_grants_exactly_the_calls_the_code_makes() {
    let kit = Kit::new().await;
    let handler_calls = Calls::new();
    let fanout_calls = Calls::new();
    let h = kit.handler_with(&[("BRIDGE_MAX_SUBSCRIPTIONS", "3")], &handler_calls);
    // Parts of one: every message with two recipients is split.
    let f = kit
        .fanout_with(&[("BRIDGE_FANOUT_PART_SIZE", "1")], &fanout_calls)
        .with_invoker(kit.invoker("iot-fanout", &fanout_calls));
    kit.standin.set_retained("t/1", b"r");
    // Every path of the handler that calls AWS.
    connect(&h, "a", &Permissions::allow_all()).await;
    connect(&h, "b", &Permissions::allow_all()).await;
    for frame in [
        r#"{"action":"subscribe","channel":"t/+","retained":true}"#,
        r#"{"action":"subscribe","channel":"t/1","retained":true}"#,
        r#"{"action":"subscribe","channel":"u/#"}"#,
        r#"{"action":"publish","channel":"t/1","data":1}"#,
        r#"{"action":"publish","channel":"t/2","data":2,"retain":true}"#,
        r#"{"action":"unsubscribe","channel":"u/#"}"#,
    ] {
        let r = send(&h, "a", frame).await;
        assert!(r.is_none(), "{frame}: {r:?}");
    }
    send(&h, "b", r#"{"action":"subscribe","channel":"t/+"}"#).await;
    // A connection whose token ended: the handler closes it on its next frame
    // (DeleteConnection)...
    let now = now_secs();
    let mut ended = context_for(&Permissions::allow_all());
    ended["expires"] = serde_json::json!((now - 1).to_string());
    let r = handle(&h, ws_event("$connect", "ended", None, Some(ended.clone()))).await;
    assert_eq!(r.status_code, 200);
    let r = handle(
        &h,
        ws_event(
            "$default",
            "ended",
            Some(r#"{"action":"ping"}"#),
            Some(ended),
        ),
    )
    .await;
    assert!(body(&r).is_none());
    // ...and so does the fan-out when it finds one among a topic's subscribers.
    let setup = kit.store(&Calls::new());
    let expired = bridge::auth::Credentials {
        perms: Permissions::allow_all(),
        expires_at: Some(now as u64 - 1),
    };
    setup
        .put_connection("stale", &expired, now * 1000, now + 600)
        .await
        .unwrap();
    setup
        .subscribe(
            "stale",
            "t/1",
            "t/1",
            now + 600,
            Some(now - 1),
            10,
            now,
            600,
        )
        .await
        .unwrap();
    // The subscription limit under concurrency takes the store's read path.
    let frames: Vec<String> = (0..3)
        .map(|i| format!(r#"{{"action":"subscribe","channel":"v/{i}"}}"#))
        .collect();
    futures_util::future::join_all(frames.iter().map(|fr| send(&h, "a", fr))).await;
    // Every path of the fan-out: registry, lookups, posts, a part handed
    // off (Invoke) and run, a gone connection...
    kit.standin.set_gone("b");
    let report = f.handle(rule_event("t/1", b"m")).await.unwrap();
    assert_eq!(
        (report.delivered, report.handed_off, report.expired),
        (1, 1, 1)
    );
    let parts = kit.standin.take_invocations();
    assert_eq!(parts.len(), 1);
    let report = f.handle(parts[0].clone()).await.unwrap();
    assert_eq!(report.gone, 1);
    // ...and, with no time left and Lambda's Invoke failing, what is left
    // recorded for the retry (a progress row).
    kit.standin.fail_invocations(&[500, 500, 500]);
    let no_time =
        lambdas::budget::Budget::until(std::time::Instant::now(), std::time::Duration::ZERO);
    let err = f
        .handle_within(rule_event_with_id("t/1", b"m", "iam-left"), no_time)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("recorded for the retry"), "{err}");
    let r = handle(&h, ws_event("$disconnect", "a", None, None)).await;
    assert_eq!(r.status_code, 200);

    // The retained publish was recorded as one: it needs iot:RetainPublish.
    let handler_needs = needed(&handler_calls);
    assert!(handler_needs.contains(&Permission {
        action: "iot:RetainPublish".into(),
        resource: Resource::Topic
    }));
    let t = template();
    check_grants(&t, "HandlerFunction", &handler_needs);
    check_grants(&t, "FanoutFunction", &needed(&fanout_calls));
    check_grants(&t, "AuthorizerFunction", &BTreeSet::new());
}

/// The grant check itself: a template missing one permission a call needs
/// (here `iot:RetainPublish`) fails it, and so does an extra grant.
#[test]
fn the_grant_check_catches_a_missing_or_extra_grant() {
    let needs: BTreeSet<Permission> = [
        ("iot:Publish", Resource::Topic),
        ("iot:RetainPublish", Resource::Topic),
        ("iot:GetRetainedMessage", Resource::Topic),
        ("iot:ListRetainedMessages", Resource::Any),
    ]
    .into_iter()
    .map(|(a, r)| Permission {
        action: a.into(),
        resource: r,
    })
    .collect();
    let t = template();
    let strip = |t: &mut Y, action: &str| {
        for st in t["Resources"]["HandlerRole"]["Properties"]["Policies"][0]["PolicyDocument"]
            ["Statement"]
            .as_sequence_mut()
            .unwrap()
        {
            if let Y::Sequence(a) = &mut st["Action"] {
                a.retain(|x| x.as_str() != Some(action));
            }
        }
    };
    // Only the handler's IoT statements, compared with the IoT needs.
    let iot_only = |t: &Y| {
        let mut t = t.clone();
        let sts = t["Resources"]["HandlerRole"]["Properties"]["Policies"][0]["PolicyDocument"]
            ["Statement"]
            .as_sequence_mut()
            .unwrap();
        sts.retain(|st| {
            let text = format!("{:?}", st["Action"]);
            text.contains("iot:") || text.contains("logs:")
        });
        t
    };
    let fails = |t: &Y, needs: &BTreeSet<Permission>| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_grants(t, "HandlerFunction", needs)
        }))
        .is_err()
    };
    assert!(!fails(&iot_only(&t), &needs), "the template as it is");
    let mut missing = iot_only(&t);
    strip(&mut missing, "iot:RetainPublish");
    assert!(fails(&missing, &needs), "without iot:RetainPublish");
    let fewer: BTreeSet<Permission> = needs
        .iter()
        .filter(|p| p.action != "iot:GetRetainedMessage")
        .cloned()
        .collect();
    assert!(fails(&iot_only(&t), &fewer), "a grant no call needs");
}

/// Every resource a value refers to (`!Ref`, `!GetAtt`, `${X}` in `!Sub`,
/// in either branch of an `!If`).
fn references(v: &Y, out: &mut BTreeSet<String>) {
    match v {
        Y::Tagged(t) => {
            let tag = t.tag.to_string();
            match (tag.as_str(), &t.value) {
                ("!Ref", Y::String(name)) => {
                    out.insert(name.clone());
                }
                ("!GetAtt", Y::String(path)) => {
                    out.insert(path.split('.').next().unwrap().to_string());
                }
                ("!Sub", Y::String(text)) => {
                    for part in text.split("${").skip(1) {
                        let name = part.split('}').next().unwrap();
                        out.insert(name.split('.').next().unwrap().to_string());
                    }
                }
                _ => references(&t.value, out),
            }
        }
        Y::Sequence(items) => items.iter().for_each(|i| references(i, out)),
        Y::Mapping(m) => m.values().for_each(|i| references(i, out)),
        _ => {}
    }
}

/// Whether CloudFormation creates `to` before `from` (a chain of references
/// or DependsOn from one to the other).
fn waits_for(t: &Y, from: &str, to: &str) -> bool {
    let resources = t["Resources"].as_mapping().unwrap();
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let r = &t["Resources"][name.as_str()];
        let mut refs = BTreeSet::new();
        references(&r["Properties"], &mut refs);
        references(&r["Metadata"], &mut refs);
        match &r["DependsOn"] {
            Y::String(d) => {
                refs.insert(d.clone());
            }
            Y::Sequence(ds) => refs.extend(ds.iter().filter_map(|d| d.as_str().map(String::from))),
            _ => {}
        }
        for next in refs {
            if next == to {
                return true;
            }
            if resources.contains_key(next.as_str()) {
                todo.push(next);
            }
        }
    }
    false
}

#[test]
fn the_stage_waits_for_the_account_logging_role() {
    let t = template();
    assert!(!t["Resources"]["Stage"]["Properties"]["AccessLogSettings"].is_null());
    // Created in this stack on a first deploy: the stage's access logs need it first.
    assert_eq!(
        resource(&t, "ApiGatewayAccount")["Condition"].as_str(),
        Some("SetAccountRole")
    );
    assert!(
        waits_for(&t, "Stage", "ApiGatewayAccount"),
        "the stage with access logs does not wait for the account's CloudWatch role"
    );
    // The helper sees a chain, and no chain where there is none.
    assert!(waits_for(&t, "Stage", "DefaultRouteResponse"));
    assert!(!waits_for(&t, "ConnectionsTable", "Stage"));
}

#[test]
fn the_account_logging_role_outlives_the_stack() {
    let t = template();
    let role = resource(&t, "ApiGatewayCloudWatchRole");
    // The account keeps pointing at it after a teardown, or a deploy that
    // stops setting it: deleting it would stop access logs account-wide.
    assert_eq!(role["DeletionPolicy"].as_str(), Some("Retain"));
    assert_eq!(role["UpdateReplacePolicy"].as_str(), Some("Retain"));
    let (_, arn) = untag(&resource(&t, "ApiGatewayAccount")["Properties"]["CloudWatchRoleArn"]);
    assert_eq!(arn.as_str(), Some("ApiGatewayCloudWatchRole.Arn"));
}

#[test]
fn the_fanout_concurrency_is_bounded() {
    let t = template();
    let p = &t["Parameters"]["FanoutReservedConcurrency"];
    assert_eq!(p["Type"].as_str(), Some("Number"));
    let default = p["Default"].as_u64().expect("a numeric default");
    assert!(
        (1..=200).contains(&default),
        "{default}: bounded, and well below the default 1,000 regional quota"
    );
    let (tag, v) =
        untag(&resource(&t, "FanoutFunction")["Properties"]["ReservedConcurrentExecutions"]);
    assert_eq!(tag.as_deref(), Some("!If"), "{v:?}");
    let (cond, reserved) = (v[0].as_str().unwrap(), untag(&v[1]));
    assert_eq!(
        (reserved.0.as_deref(), reserved.1.as_str()),
        (Some("!Ref"), Some("FanoutReservedConcurrency"))
    );
    // Only 0 turns the reservation off.
    let (tag, not) = untag(&t["Conditions"][cond]);
    assert_eq!(tag.as_deref(), Some("!Not"));
    let (tag, eq) = untag(&not[0]);
    assert_eq!(tag.as_deref(), Some("!Equals"));
    assert_eq!(untag(&eq[0]).1.as_str(), Some("FanoutReservedConcurrency"));
    assert_eq!(eq[1].as_u64(), Some(0));
}

/// ws-handler holds a subscribe's ack as long as iot-fanout may reuse a
/// read: one parameter feeds both, within the bounds the code accepts.
#[test]
fn the_subscribe_wait_covers_the_fanout_cache() {
    let t = template();
    for function in ["HandlerFunction", "FanoutFunction"] {
        let vars = &resource(&t, function)["Properties"]["Environment"]["Variables"];
        let (tag, v) = untag(&vars["BRIDGE_LOOKUP_CACHE_MS"]);
        assert_eq!(
            (tag.as_deref(), v.as_str()),
            (Some("!Ref"), Some("LookupCacheMillis")),
            "{function}"
        );
    }
    let p = &t["Parameters"]["LookupCacheMillis"];
    assert_eq!(
        (
            p["Default"].as_u64(),
            p["MinValue"].as_u64(),
            p["MaxValue"].as_u64()
        ),
        (
            Some(lambdas::config::DEFAULT_LOOKUP_CACHE_MS),
            Some(0),
            Some(lambdas::config::MAX_LOOKUP_CACHE_MS)
        )
    );
    let p = &t["Parameters"]["FanoutPartSize"];
    assert_eq!(
        p["Default"].as_u64(),
        Some(lambdas::config::DEFAULT_PART_SIZE as u64)
    );
    let vars = &resource(&t, "FanoutFunction")["Properties"]["Environment"]["Variables"];
    assert_eq!(
        untag(&vars["BRIDGE_FANOUT_PART_SIZE"]).1.as_str(),
        Some("FanoutPartSize")
    );
}

/// The alarms (resource name -> properties).
fn alarms(t: &Y) -> BTreeMap<String, Y> {
    t["Resources"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["Type"].as_str() == Some("AWS::CloudWatch::Alarm"))
        .map(|(n, r)| (n.as_str().unwrap().to_string(), r["Properties"].clone()))
        .collect()
}

fn fires_above_zero(name: &str, a: &Y) {
    assert_eq!(a["Threshold"].as_u64(), Some(0), "{name}");
    assert_eq!(
        a["ComparisonOperator"].as_str(),
        Some("GreaterThanThreshold"),
        "{name}"
    );
    assert_eq!(
        a["TreatMissingData"].as_str(),
        Some("notBreaching"),
        "{name}"
    );
    // Notifies the optional SNS topic, or nobody.
    let (tag, v) = untag(&a["AlarmActions"]);
    assert_eq!(tag.as_deref(), Some("!If"), "{name}");
    assert_eq!(v[0].as_str(), Some("HasAlarmTopic"), "{name}");
}

#[test]
fn an_alarm_watches_the_dead_letter_queue() {
    let t = template();
    let alarms = alarms(&t);
    let (name, a) = alarms
        .iter()
        .find(|(_, a)| a["Namespace"].as_str() == Some("AWS/SQS"))
        .expect("an alarm on the dead-letter queue");
    assert_eq!(
        a["MetricName"].as_str(),
        Some("ApproximateNumberOfMessagesVisible")
    );
    assert_eq!(a["Dimensions"][0]["Name"].as_str(), Some("QueueName"));
    let (_, q) = untag(&a["Dimensions"][0]["Value"]);
    assert_eq!(q.as_str(), Some("FanoutDeadLetterQueue.QueueName"));
    // The queue the fan-out's failed invocations go to.
    let (_, target) =
        untag(&resource(&t, "FanoutFunction")["Properties"]["DeadLetterQueue"]["TargetArn"]);
    assert_eq!(target.as_str(), Some("FanoutDeadLetterQueue.Arn"));
    fires_above_zero(name, a);
}

/// Metrics the alarms read that the fan-out does not emit yet. Once it
/// emits one, its entry must go.
const METRICS_AHEAD_OF_CODE: &[&str] = &[];

#[tokio::test]
async fn an_alarm_watches_throttled_posts_as_the_fanout_reports_them() {
    let t = template();
    let alarms = alarms(&t);
    let (name, a) = alarms
        .iter()
        .find(|(_, a)| a["MetricName"].as_str() == Some("Throttled"))
        .expect("an alarm on throttled posts");
    fires_above_zero(name, a);
    assert_eq!(a["Statistic"].as_str(), Some("Sum"));
    // The metric as the iot-fanout binary writes it (EMF on stdout).
    let standin = StandIn::start().await;
    let ddb = aws_sdk_dynamodb::Client::new(&sdk(dynamodb_endpoint()));
    let table = create_table(&ddb).await;
    let mut env = aws_env(dynamodb_endpoint(), &standin);
    env.push(("TABLE_NAME".into(), table));
    let fanout = LambdaProcess::start(env!("CARGO_BIN_EXE_iot-fanout"), "iot-fanout", &env).await;
    fanout
        .invoke(rule_event("nobody/listens", b"x"))
        .await
        .expect("the fan-out answers");
    // The line may reach us a moment after the answer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let emf = loop {
        if let Some(line) = fanout.metrics().pop() {
            break line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no EMF line from iot-fanout"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let spec = &emf["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(a["Namespace"].as_str(), spec["Namespace"].as_str());
    let dims = &spec["Dimensions"][0];
    assert_eq!(dims.as_array().map(Vec::len), Some(1), "{dims}");
    assert_eq!(a["Dimensions"][0]["Name"].as_str(), dims[0].as_str());
    let dim = dims[0].as_str().unwrap();
    assert_eq!(a["Dimensions"][0]["Value"].as_str(), emf[dim].as_str());
    let emitted: BTreeSet<&str> = spec["Metrics"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["Name"].as_str())
        .collect();
    let metric = a["MetricName"].as_str().unwrap();
    if METRICS_AHEAD_OF_CODE.contains(&metric) {
        assert!(
            !emitted.contains(metric),
            "iot-fanout now emits {metric}: remove it from METRICS_AHEAD_OF_CODE"
        );
    } else {
        assert!(
            emitted.contains(metric),
            "iot-fanout does not emit {metric}: {emitted:?}"
        );
    }
}

/// Whether CloudFormation's AllowedPattern (a whole-value match) takes `value`;
/// python3's `re` reads these simple patterns as Java's does.
fn allowed(pattern: &str, value: &str) -> bool {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import re, sys; sys.exit(0 if re.fullmatch(sys.argv[1], sys.argv[2]) else 1)",
            pattern,
            value,
        ])
        .output()
        .expect("python3 checks the parameter patterns: apt-get install python3");
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success()
}

#[test]
fn the_handler_publishes_only_under_the_topic_prefix() {
    let t = template();
    let sts = resource(&t, "HandlerRole")["Properties"]["Policies"][0]["PolicyDocument"]
        ["Statement"]
        .clone();
    let publish = sts
        .as_sequence()
        .unwrap()
        .iter()
        .find(|st| format!("{:?}", st["Action"]).contains("iot:Publish"))
        .expect("a statement granting iot:Publish")
        .clone();
    let (tag, branches) = untag(&publish["Resource"]);
    assert_eq!(tag.as_deref(), Some("!If"));
    let cond = branches[0].as_str().unwrap();
    assert_eq!(
        resource_alternatives(&publish["Resource"]),
        [
            format!("{ARN}:iot:{ACCOUNT}:topic/${{TopicPrefix}}/*"),
            format!("{ARN}:iot:{ACCOUNT}:topic/*"),
        ]
    );
    // The prefixed branch whenever there is a prefix.
    let (tag, not) = untag(&t["Conditions"][cond]);
    assert_eq!(tag.as_deref(), Some("!Not"));
    let (_, eq) = untag(&not[0]);
    assert_eq!(untag(&eq[0]).1.as_str(), Some("TopicPrefix"));
    assert_eq!(eq[1].as_str(), Some(""));
    // A prefix that would widen or break the ARN is refused at deploy time.
    let pattern = t["Parameters"]["TopicPrefix"]["AllowedPattern"]
        .as_str()
        .expect("TopicPrefix has an AllowedPattern");
    for ok in ["", "a", "fleet/eu-1", "a b", "a//b"] {
        assert!(allowed(pattern, ok), "{ok:?} is refused");
    }
    for bad in [
        "/a",
        "a/",
        "/",
        "a/#",
        "a/+/b",
        "a*",
        "a?",
        "${aws:username}",
        "$aws",
    ] {
        assert!(!allowed(pattern, bad), "{bad:?} is allowed");
    }
}
