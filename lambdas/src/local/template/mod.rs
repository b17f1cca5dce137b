//! Reading `infra/template.yaml` the way CloudFormation would, for the parts
//! aws-local plays: nothing about the deployment is written twice.
//!
//! From the template come the functions (binary from `CodeUri`, environment,
//! timeout, memory, reserved concurrency, async retries), the WebSocket API
//! (route selection expression, routes, which route has an authorizer and
//! which a route response, the stage), the DynamoDB table (keys, attributes,
//! billing, TTL, indexes) and the IoT topic rules (SQL, the functions they
//! invoke). Parameters, conditions and the intrinsic functions the template
//! uses (`Ref`, `Fn::Sub`, `Fn::GetAtt`, `Fn::If`, `Fn::Equals`, `Fn::Not`,
//! `Fn::And`, `Fn::Or`, `Fn::Join`, `Fn::Select`, `Condition`) are evaluated
//! with the parameter values of [`crate::local::parameters`] (the evaluator is
//! `eval.rs`, beside this file); resources whose
//! condition is false do not exist. Anything aws-local cannot play (another
//! integration type, IAM authorization, a non-custom runtime, an intrinsic
//! function it does not know) is refused with the resource's name, never
//! skipped silently.
//!
//! Physical names: the table is named by the caller, the API id and function
//! names are local (`ws-handler` is the binary's name), ARNs are built from
//! them with the local region and account.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_yaml::{Mapping, Value as Yaml};

mod eval;

use eval::Eval;

/// Why the template cannot be played.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("infra/template.yaml: {0}")]
pub struct TemplateError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, TemplateError> {
    Err(TemplateError(msg.into()))
}

/// The local names the template's references resolve to.
#[derive(Debug, Clone)]
pub struct Names {
    pub region: String,
    pub account: String,
    pub stack: String,
    pub api_id: String,
    pub table: String,
}

/// Where a REQUEST authorizer takes its identity from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    Header(String),
    Query(String),
}

/// A route's authorizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorizer {
    /// The function's logical id.
    pub function: String,
    /// Empty: the authorizer is always invoked.
    pub identity: Vec<IdentitySource>,
}

/// One route of the WebSocket API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub key: String,
    /// The logical id of the function its `AWS_PROXY` integration invokes.
    pub function: String,
    pub authorizer: Option<Authorizer>,
    /// Whether the integration's response body goes back to the client.
    pub route_response: bool,
}

/// One Lambda function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub logical_id: String,
    /// The binary's file name (`CodeUri`'s last directory, as `cargo lambda
    /// build --lambda-dir` lays it out).
    pub name: String,
    /// The environment the template gives it, evaluated.
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    pub memory_mb: u32,
    /// `ReservedConcurrentExecutions`, if set.
    pub reserved: Option<usize>,
    /// Retries of an asynchronous invocation (`EventInvokeConfig`).
    pub retries: u32,
    /// Oldest an asynchronous event may get before it is dropped.
    pub max_event_age: Duration,
}

impl Function {
    pub fn arn(&self, names: &Names) -> String {
        function_arn(names, &self.name)
    }
}

/// A global secondary index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub name: String,
    pub keys: Vec<(String, String)>,
    pub projection: String,
    pub non_key: Vec<String>,
}

/// The DynamoDB table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub logical_id: String,
    pub name: String,
    /// (name, type) as in `AttributeDefinitions`.
    pub attributes: Vec<(String, String)>,
    /// (name, HASH|RANGE) as in `KeySchema`.
    pub keys: Vec<(String, String)>,
    pub billing_mode: String,
    pub ttl_attribute: Option<String>,
    pub indexes: Vec<Index>,
}

/// An IoT topic rule with Lambda actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRule {
    pub logical_id: String,
    pub sql: String,
    /// Logical ids of the functions it invokes.
    pub functions: Vec<String>,
}

/// Everything aws-local plays, read from the template.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub names: Names,
    pub stage: String,
    /// The JSON path of the route selection expression
    /// (`$request.body.action` → `["action"]`).
    pub route_selection: Vec<String>,
    pub routes: BTreeMap<String, Route>,
    pub functions: BTreeMap<String, Function>,
    pub table: Table,
    pub rules: Vec<TopicRule>,
    /// What the template asks for that aws-local does not play (said at start).
    pub notes: Vec<String>,
}

impl Deployment {
    /// Reads the template text with these parameter values (every parameter
    /// must have one: see [`crate::local::parameters`]).
    pub fn read(
        text: &str,
        params: &BTreeMap<String, String>,
        names: Names,
    ) -> Result<Deployment, TemplateError> {
        let doc = parse(text)?;
        let (eval, live, globals) = doc.evaluator(params, &names)?;
        let of_type = |t: &str| of_type(&live, t);
        let mut notes = Vec::new();

        // Functions.
        let mut functions = BTreeMap::new();
        for t in ["AWS::Serverless::Function", "AWS::Lambda::Function"] {
            for (id, r) in of_type(t) {
                let f = eval.function(&id, r, globals)?;
                functions.insert(id, f);
            }
        }
        let by_arn = |text: &str, what: &str| -> Result<String, TemplateError> {
            functions
                .values()
                .find(|f| text.contains(&f.arn(&names)))
                .map(|f| f.logical_id.clone())
                .ok_or_else(|| {
                    TemplateError(format!(
                        "{what}: {text:?} names none of the template's functions"
                    ))
                })
        };

        // The WebSocket API.
        let apis: Vec<_> = of_type("AWS::ApiGatewayV2::Api")
            .into_iter()
            .filter(|(_, r)| {
                r.get("Properties")
                    .and_then(|p| p.get("ProtocolType"))
                    .and_then(Yaml::as_str)
                    == Some("WEBSOCKET")
            })
            .collect();
        let (api_logical, api) = match apis.as_slice() {
            [one] => one.clone(),
            [] => return err("no AWS::ApiGatewayV2::Api with ProtocolType WEBSOCKET"),
            _ => return err("more than one WebSocket API; aws-local plays one"),
        };
        let expression = eval.string(&props(api)?["RouteSelectionExpression"], &api_logical)?;
        let route_selection = route_selection(&expression)
            .ok_or_else(|| TemplateError(format!(
                "{api_logical}: route selection expression {expression:?} is not $request.body.<path>"
            )))?;
        let on_api = |r: &Yaml, id: &str| -> Result<bool, TemplateError> {
            Ok(eval.string(&props(r)?["ApiId"], id)? == names.api_id)
        };

        let mut stage = None;
        for (id, r) in of_type("AWS::ApiGatewayV2::Stage") {
            if on_api(r, &id)? {
                stage = Some(eval.string(&props(r)?["StageName"], &id)?);
            }
        }
        let stage = stage.ok_or_else(|| TemplateError(format!("no stage of {api_logical}")))?;

        let mut integrations = BTreeMap::new();
        for (id, r) in of_type("AWS::ApiGatewayV2::Integration") {
            if !on_api(r, &id)? {
                continue;
            }
            let p = props(r)?;
            let kind = eval.string(&p["IntegrationType"], &id)?;
            if kind != "AWS_PROXY" {
                return err(format!(
                    "{id}: integration type {kind}; aws-local plays AWS_PROXY (Lambda proxy) integrations"
                ));
            }
            let uri = eval.string(&p["IntegrationUri"], &id)?;
            integrations.insert(id.clone(), by_arn(&uri, &id)?);
        }
        let mut authorizers = BTreeMap::new();
        for (id, r) in of_type("AWS::ApiGatewayV2::Authorizer") {
            if !on_api(r, &id)? {
                continue;
            }
            let p = props(r)?;
            let kind = eval.string(&p["AuthorizerType"], &id)?;
            if kind != "REQUEST" {
                return err(format!(
                    "{id}: authorizer type {kind}; aws-local plays REQUEST authorizers"
                ));
            }
            let uri = eval.string(&p["AuthorizerUri"], &id)?;
            let mut identity = Vec::new();
            if let Some(sources) = eval.value(&p["IdentitySource"])? {
                for s in sources
                    .as_sequence()
                    .cloned()
                    .unwrap_or_else(|| vec![sources.clone()])
                {
                    let s =
                        scalar(&s).ok_or_else(|| TemplateError(format!("{id}: IdentitySource")))?;
                    identity.push(identity_source(&s).ok_or_else(|| {
                        TemplateError(format!("{id}: identity source {s:?} is not route.request.header.X or route.request.querystring.X"))
                    })?);
                }
            }
            authorizers.insert(
                id.clone(),
                Authorizer {
                    function: by_arn(&uri, &id)?,
                    identity,
                },
            );
        }
        let mut route_ids = BTreeMap::new();
        let mut routes = BTreeMap::new();
        for (id, r) in of_type("AWS::ApiGatewayV2::Route") {
            if !on_api(r, &id)? {
                continue;
            }
            let p = props(r)?;
            let key = eval.string(&p["RouteKey"], &id)?;
            let target = eval.string(&p["Target"], &id)?;
            let integration = target.strip_prefix("integrations/").unwrap_or(&target);
            let function = integrations.get(integration).cloned().ok_or_else(|| {
                TemplateError(format!(
                    "{id}: target {target:?} is not one of the API's integrations"
                ))
            })?;
            let auth_type = match eval.value(&p["AuthorizationType"])? {
                Some(v) => scalar(&v).unwrap_or_default(),
                None => "NONE".into(),
            };
            let authorizer = match auth_type.as_str() {
                "NONE" => None,
                "CUSTOM" => {
                    let a = eval.string(&p["AuthorizerId"], &id)?;
                    Some(authorizers.get(&a).cloned().ok_or_else(|| {
                        TemplateError(format!("{id}: authorizer {a:?} is not one of the API's"))
                    })?)
                }
                other => {
                    return err(format!(
                        "{id}: authorization type {other}; aws-local plays NONE and CUSTOM"
                    ))
                }
            };
            if authorizer.is_some() && key != "$connect" {
                return err(format!(
                    "{id}: API Gateway authorizes WebSocket APIs on $connect only"
                ));
            }
            route_ids.insert(id.clone(), key.clone());
            routes.insert(
                key.clone(),
                Route {
                    key,
                    function,
                    authorizer,
                    route_response: false,
                },
            );
        }
        for (id, r) in of_type("AWS::ApiGatewayV2::RouteResponse") {
            if !on_api(r, &id)? {
                continue;
            }
            let route = eval.string(&props(r)?["RouteId"], &id)?;
            let key = route_ids.get(&route).ok_or_else(|| {
                TemplateError(format!("{id}: RouteId {route:?} is not a route of the API"))
            })?;
            if let Some(route) = routes.get_mut(key) {
                route.route_response = true;
            }
        }

        let table = the_table(&eval, &live)?;

        // Topic rules.
        let mut rules = Vec::new();
        for (id, r) in of_type("AWS::IoT::TopicRule") {
            let payload = &props(r)?["TopicRulePayload"];
            if eval
                .value(&payload["RuleDisabled"])?
                .and_then(|v| scalar(&v))
                .as_deref()
                == Some("true")
            {
                notes.push(format!("topic rule {id} is disabled"));
                continue;
            }
            let sql = eval.string(&payload["Sql"], &id)?;
            let mut functions_of_rule = Vec::new();
            let actions = eval
                .value(&payload["Actions"])?
                .unwrap_or(Yaml::Sequence(vec![]));
            for action in actions.as_sequence().into_iter().flatten() {
                let Some(map) = action.as_mapping() else {
                    continue;
                };
                for (kind, body) in map {
                    let kind = kind.as_str().unwrap_or_default();
                    if kind == "Lambda" {
                        let arn = body.get("FunctionArn").and_then(scalar).ok_or_else(|| {
                            TemplateError(format!("{id}: Lambda action without FunctionArn"))
                        })?;
                        functions_of_rule.push(by_arn(&arn, &id)?);
                    } else {
                        notes.push(format!("topic rule {id}: its {kind} action is not played"));
                    }
                }
            }
            rules.push(TopicRule {
                logical_id: id,
                sql,
                functions: functions_of_rule,
            });
        }

        Ok(Deployment {
            names,
            stage,
            route_selection,
            routes,
            functions,
            table,
            rules,
            notes,
        })
    }

    /// The function a route's integration invokes.
    pub fn function(&self, logical_id: &str) -> &Function {
        &self.functions[logical_id]
    }

    /// Functions something invokes (routes, authorizers, rules), by logical id.
    pub fn invoked(&self) -> BTreeSet<String> {
        let mut ids = BTreeSet::new();
        for r in self.routes.values() {
            ids.insert(r.function.clone());
            if let Some(a) = &r.authorizer {
                ids.insert(a.function.clone());
            }
        }
        for rule in &self.rules {
            ids.extend(rule.functions.iter().cloned());
        }
        ids
    }
}

/// Only the DynamoDB table of the template (what the Lambda tests create).
pub fn read_table(
    text: &str,
    params: &BTreeMap<String, String>,
    names: &Names,
) -> Result<Table, TemplateError> {
    let doc = parse(text)?;
    let (eval, live, _) = doc.evaluator(params, names)?;
    the_table(&eval, &live)
}

/// The template, parsed.
struct Doc {
    resources: Mapping,
    conditions: Mapping,
    globals: Mapping,
}

fn parse(text: &str) -> Result<Doc, TemplateError> {
    let doc: Yaml =
        serde_yaml::from_str(text).map_err(|e| TemplateError(format!("not YAML: {e}")))?;
    let map = |v: Option<&Yaml>| v.and_then(Yaml::as_mapping).cloned().unwrap_or_default();
    let resources = doc
        .get("Resources")
        .and_then(Yaml::as_mapping)
        .cloned()
        .ok_or_else(|| TemplateError("no Resources".into()))?;
    Ok(Doc {
        resources,
        conditions: map(doc.get("Conditions")),
        globals: map(doc.get("Globals").and_then(|g| g.get("Function"))),
    })
}

/// Resources that exist (whose condition, if any, holds), by logical id.
type Live<'a> = Vec<(String, &'a Yaml)>;

impl Doc {
    /// An evaluator, and the resources that exist, and the `Globals` of
    /// functions.
    fn evaluator<'a>(
        &'a self,
        params: &'a BTreeMap<String, String>,
        names: &'a Names,
    ) -> Result<(Eval<'a>, Live<'a>, &'a Mapping), TemplateError> {
        let eval = Eval {
            params,
            conditions: &self.conditions,
            resources: &self.resources,
            names,
            memo: RefCell::new(BTreeMap::new()),
        };
        let mut live = Vec::new();
        for (k, r) in &self.resources {
            let id = k.as_str().unwrap_or_default().to_string();
            if let Some(c) = r.get("Condition") {
                let name = c
                    .as_str()
                    .ok_or_else(|| TemplateError(format!("{id}: Condition is not a name")))?;
                if !eval.condition(name)? {
                    continue;
                }
            }
            live.push((id, r));
        }
        Ok((eval, live, &self.globals))
    }
}

fn of_type<'a>(live: &[(String, &'a Yaml)], t: &str) -> Vec<(String, &'a Yaml)> {
    live.iter()
        .filter(|(_, r)| r.get("Type").and_then(Yaml::as_str) == Some(t))
        .map(|(id, r)| (id.clone(), *r))
        .collect()
}

fn the_table(eval: &Eval, live: &[(String, &Yaml)]) -> Result<Table, TemplateError> {
    match of_type(live, "AWS::DynamoDB::Table").as_slice() {
        [(id, table)] => eval.table(id, table),
        [] => err("no AWS::DynamoDB::Table"),
        _ => err("more than one DynamoDB table; aws-local creates one"),
    }
}

/// The template's parameters: (name, definition).
pub fn parameters(text: &str) -> Result<Vec<(String, Parameter)>, TemplateError> {
    let doc: Yaml =
        serde_yaml::from_str(text).map_err(|e| TemplateError(format!("not YAML: {e}")))?;
    let mut out = Vec::new();
    for (k, v) in doc
        .get("Parameters")
        .and_then(Yaml::as_mapping)
        .into_iter()
        .flatten()
    {
        let name = k.as_str().unwrap_or_default().to_string();
        let get = |key: &str| v.get(key).and_then(scalar);
        out.push((
            name,
            Parameter {
                kind: get("Type").unwrap_or_else(|| "String".into()),
                default: get("Default"),
                allowed_values: v
                    .get("AllowedValues")
                    .and_then(Yaml::as_sequence)
                    .map(|s| s.iter().filter_map(scalar).collect()),
                allowed_pattern: get("AllowedPattern"),
                min_value: get("MinValue").and_then(|s| s.parse().ok()),
                max_value: get("MaxValue").and_then(|s| s.parse().ok()),
                min_length: get("MinLength").and_then(|s| s.parse().ok()),
                max_length: get("MaxLength").and_then(|s| s.parse().ok()),
                no_echo: get("NoEcho").as_deref() == Some("true"),
            },
        ));
    }
    Ok(out)
}

/// A parameter's definition.
#[derive(Debug, Clone, Default)]
pub struct Parameter {
    pub kind: String,
    pub default: Option<String>,
    pub allowed_values: Option<Vec<String>>,
    pub allowed_pattern: Option<String>,
    pub min_value: Option<f64>,
    pub max_value: Option<f64>,
    pub min_length: Option<usize>,
    pub max_length: Option<usize>,
    pub no_echo: bool,
}

impl Parameter {
    /// Checks a value as CloudFormation would; the reason never repeats a
    /// `NoEcho` value.
    pub fn check(&self, name: &str, value: &str) -> Result<(), TemplateError> {
        let shown = if self.no_echo {
            "(hidden)".to_string()
        } else {
            format!("{value:?}")
        };
        if let Some(allowed) = &self.allowed_values {
            if !allowed.iter().any(|a| a == value) {
                return err(format!(
                    "parameter {name}: {shown} is not one of {allowed:?}"
                ));
            }
        }
        if let Some(pattern) = &self.allowed_pattern {
            let re = regex::Regex::new(&format!("^(?:{pattern})$"))
                .map_err(|e| TemplateError(format!("parameter {name}: AllowedPattern: {e}")))?;
            if !re.is_match(value) {
                return err(format!(
                    "parameter {name}: {shown} does not match {pattern}"
                ));
            }
        }
        let len = value.chars().count();
        if self.min_length.is_some_and(|m| len < m) || self.max_length.is_some_and(|m| len > m) {
            return err(format!("parameter {name}: {shown} has the wrong length"));
        }
        if self.kind == "Number" {
            let n: f64 = value
                .trim()
                .parse()
                .map_err(|_| TemplateError(format!("parameter {name}: {shown} is not a number")))?;
            if self.min_value.is_some_and(|m| n < m) || self.max_value.is_some_and(|m| n > m) {
                return err(format!(
                    "parameter {name}: {shown} is outside {:?}..{:?}",
                    self.min_value, self.max_value
                ));
            }
        }
        Ok(())
    }
}

/// `$request.body.a.b` (or `${request.body.a.b}`) → `["a", "b"]`.
fn route_selection(expression: &str) -> Option<Vec<String>> {
    let e = expression.trim();
    let e = e
        .strip_prefix("${")
        .and_then(|e| e.strip_suffix('}'))
        .or_else(|| e.strip_prefix('$'))?;
    let path = e.strip_prefix("request.body.")?;
    let parts: Vec<String> = path.split('.').map(str::to_string).collect();
    (!parts.iter().any(String::is_empty)).then_some(parts)
}

fn identity_source(s: &str) -> Option<IdentitySource> {
    if let Some(h) = s.strip_prefix("route.request.header.") {
        return Some(IdentitySource::Header(h.to_string()));
    }
    s.strip_prefix("route.request.querystring.")
        .map(|q| IdentitySource::Query(q.to_string()))
}

fn props(r: &Yaml) -> Result<&Yaml, TemplateError> {
    r.get("Properties")
        .ok_or_else(|| TemplateError("a resource without Properties".into()))
}

/// A scalar as CloudFormation passes it on: a string.
fn scalar(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn function_arn(names: &Names, function: &str) -> String {
    format!(
        "arn:aws:lambda:{}:{}:function:{function}",
        names.region, names.account
    )
}

/// Reading resources, with their intrinsic functions evaluated.
impl Eval<'_> {
    fn function(&self, id: &str, r: &Yaml, globals: &Mapping) -> Result<Function, TemplateError> {
        let p = props(r)?;
        let get = |key: &str| -> Result<Option<Yaml>, TemplateError> {
            match p.get(key) {
                Some(v) => self.value(v),
                None => match globals.get(key) {
                    Some(v) => self.value(v),
                    None => Ok(None),
                },
            }
        };
        if let Some(runtime) = get("Runtime")?.as_ref().and_then(scalar) {
            if !runtime.starts_with("provided") {
                return err(format!(
                    "{id}: runtime {runtime}; aws-local runs custom-runtime (provided.*) binaries"
                ));
            }
        }
        let name = function_name(id, r)?;
        let mut env = BTreeMap::new();
        for source in [globals.get("Environment"), p.get("Environment")]
            .into_iter()
            .flatten()
        {
            let vars = self.value(&source["Variables"])?.unwrap_or(Yaml::Null);
            for (k, v) in vars.as_mapping().into_iter().flatten() {
                let k = scalar(k).unwrap_or_default();
                let v = scalar(v).ok_or_else(|| {
                    TemplateError(format!("{id}: environment variable {k} is not a string"))
                })?;
                env.insert(k, v);
            }
        }
        let number = |key: &str, default: u64| -> Result<u64, TemplateError> {
            match get(key)? {
                None => Ok(default),
                Some(v) => scalar(&v)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| TemplateError(format!("{id}: {key} is not a number"))),
            }
        };
        let reserved = match get("ReservedConcurrentExecutions")? {
            None => None,
            Some(v) => Some(
                scalar(&v)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| TemplateError(format!("{id}: ReservedConcurrentExecutions")))?,
            ),
        };
        let invoke = get("EventInvokeConfig")?.unwrap_or(Yaml::Null);
        let invoke_number = |key: &str, default: u64| -> u64 {
            invoke
                .get(key)
                .and_then(scalar)
                .and_then(|s| s.parse().ok())
                .unwrap_or(default)
        };
        Ok(Function {
            logical_id: id.to_string(),
            name,
            env,
            timeout: Duration::from_secs(number("Timeout", 3)?),
            memory_mb: number("MemorySize", 128)? as u32,
            reserved,
            retries: invoke_number("MaximumRetryAttempts", 2) as u32,
            max_event_age: Duration::from_secs(invoke_number("MaximumEventAgeInSeconds", 21_600)),
        })
    }

    fn table(&self, id: &str, r: &Yaml) -> Result<Table, TemplateError> {
        let p = self
            .value(props(r)?)?
            .ok_or_else(|| TemplateError(format!("{id}: Properties")))?;
        let pairs = |v: &Yaml, a: &str, b: &str| -> Vec<(String, String)> {
            v.as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|e| Some((e.get(a).and_then(scalar)?, e.get(b).and_then(scalar)?)))
                .collect()
        };
        let keys = pairs(&p["KeySchema"], "AttributeName", "KeyType");
        if keys.is_empty() {
            return err(format!("{id}: no KeySchema"));
        }
        let ttl = p
            .get("TimeToLiveSpecification")
            .filter(|t| t.get("Enabled").and_then(scalar).as_deref() == Some("true"))
            .and_then(|t| t.get("AttributeName").and_then(scalar));
        let indexes = p
            .get("GlobalSecondaryIndexes")
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
            .map(|g| Index {
                name: g.get("IndexName").and_then(scalar).unwrap_or_default(),
                keys: pairs(&g["KeySchema"], "AttributeName", "KeyType"),
                projection: g
                    .get("Projection")
                    .and_then(|pr| pr.get("ProjectionType"))
                    .and_then(scalar)
                    .unwrap_or_else(|| "ALL".into()),
                non_key: g
                    .get("Projection")
                    .and_then(|pr| pr.get("NonKeyAttributes"))
                    .and_then(Yaml::as_sequence)
                    .into_iter()
                    .flatten()
                    .filter_map(scalar)
                    .collect(),
            })
            .collect();
        Ok(Table {
            logical_id: id.to_string(),
            name: self.names.table.clone(),
            attributes: pairs(&p["AttributeDefinitions"], "AttributeName", "AttributeType"),
            keys,
            billing_mode: p
                .get("BillingMode")
                .and_then(scalar)
                .unwrap_or_else(|| "PROVISIONED".into()),
            ttl_attribute: ttl,
            indexes,
        })
    }
}

/// The function name of a resource: its binary, the last directory of `CodeUri`.
fn function_name(id: &str, r: &Yaml) -> Result<String, TemplateError> {
    let uri = r
        .get("Properties")
        .and_then(|p| p.get("CodeUri"))
        .and_then(scalar)
        .ok_or_else(|| {
            TemplateError(format!(
                "{id}: no CodeUri directory; aws-local runs the binary CodeUri names (build/NAME/)"
            ))
        })?;
    uri.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && !n.contains(':'))
        .map(str::to_string)
        .ok_or_else(|| TemplateError(format!("{id}: CodeUri {uri:?} names no binary")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names {
            region: "us-east-1".into(),
            account: "123456789012".into(),
            stack: "channel-bridge".into(),
            api_id: "awslocal00".into(),
            table: "connections".into(),
        }
    }

    const MINI: &str = r#"
Parameters:
  Auth: {Type: String, Default: token, AllowedValues: [token, "off"]}
  Prefix: {Type: String, Default: ""}
Conditions:
  AuthOn: !Equals [!Ref Auth, token]
  HasPrefix: !Not [!Equals [!Ref Prefix, ""]]
  Both: !And [!Condition AuthOn, !Condition HasPrefix]
Resources:
  T:
    Type: AWS::DynamoDB::Table
    Properties:
      AttributeDefinitions: [{AttributeName: pk, AttributeType: S}]
      KeySchema: [{AttributeName: pk, KeyType: HASH}]
      BillingMode: PAY_PER_REQUEST
  F:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: build/fn/
      Runtime: provided.al2023
      Timeout: 7
      Environment:
        Variables:
          TABLE: !Ref T
          URL: !Sub "https://${Api}.execute-api.${AWS::Region}.${AWS::URLSuffix}/s"
          MAYBE: !If [HasPrefix, yes, !Ref AWS::NoValue]
          BOTH: !If [Both, "1", "0"]
          LIT: !Sub "${!NotMe}"
  Auth0:
    Type: AWS::Serverless::Function
    Condition: AuthOn
    Properties: {CodeUri: build/auth/}
  Api:
    Type: AWS::ApiGatewayV2::Api
    Properties: {ProtocolType: WEBSOCKET, RouteSelectionExpression: $request.body.action}
  Az:
    Type: AWS::ApiGatewayV2::Authorizer
    Condition: AuthOn
    Properties:
      ApiId: !Ref Api
      AuthorizerType: REQUEST
      AuthorizerUri: !Sub "arn:aws:apigateway:x:lambda:path/functions/${Auth0.Arn}/invocations"
      IdentitySource: [route.request.querystring.token]
  I:
    Type: AWS::ApiGatewayV2::Integration
    Properties: {ApiId: !Ref Api, IntegrationType: AWS_PROXY, IntegrationUri: !GetAtt F.Arn}
  C:
    Type: AWS::ApiGatewayV2::Route
    Properties:
      ApiId: !Ref Api
      RouteKey: $connect
      AuthorizationType: !If [AuthOn, CUSTOM, NONE]
      AuthorizerId: !If [AuthOn, !Ref Az, !Ref AWS::NoValue]
      Target: !Sub "integrations/${I}"
  D:
    Type: AWS::ApiGatewayV2::Route
    Properties: {ApiId: !Ref Api, RouteKey: $default, Target: !Sub "integrations/${I}"}
  DR:
    Type: AWS::ApiGatewayV2::RouteResponse
    Properties: {ApiId: !Ref Api, RouteId: !Ref D, RouteResponseKey: $default}
  S:
    Type: AWS::ApiGatewayV2::Stage
    Properties: {ApiId: !Ref Api, StageName: prod}
  R:
    Type: AWS::IoT::TopicRule
    Properties:
      TopicRulePayload:
        Sql: !Sub "SELECT * FROM '${Prefix}#'"
        Actions: [{Lambda: {FunctionArn: !GetAtt F.Arn}}, {Sns: {TargetArn: x}}]
"#;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut p: BTreeMap<String, String> = parameters(MINI)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.default.unwrap_or_default()))
            .collect();
        for (k, v) in pairs {
            p.insert(k.to_string(), v.to_string());
        }
        p
    }

    #[test]
    fn evaluates_references_conditions_and_routes() {
        let d = Deployment::read(MINI, &params(&[]), names()).unwrap();
        let f = &d.functions["F"];
        assert_eq!(f.name, "fn");
        assert_eq!(f.timeout, Duration::from_secs(7));
        assert_eq!(f.env["TABLE"], "connections");
        assert_eq!(
            f.env["URL"],
            "https://awslocal00.execute-api.us-east-1.amazonaws.com/s"
        );
        assert!(!f.env.contains_key("MAYBE"), "NoValue removes the variable");
        assert_eq!(f.env["BOTH"], "0");
        assert_eq!(f.env["LIT"], "${NotMe}");
        assert_eq!(d.route_selection, vec!["action".to_string()]);
        assert_eq!(d.stage, "prod");
        let connect = &d.routes["$connect"];
        assert_eq!(connect.function, "F");
        let auth = connect.authorizer.as_ref().unwrap();
        assert_eq!(auth.function, "Auth0");
        assert_eq!(auth.identity, vec![IdentitySource::Query("token".into())]);
        assert!(!connect.route_response);
        assert!(d.routes["$default"].route_response);
        assert_eq!(d.rules[0].sql, "SELECT * FROM '#'");
        assert_eq!(d.rules[0].functions, vec!["F".to_string()]);
        assert!(d.notes.iter().any(|n| n.contains("Sns")), "{:?}", d.notes);
        assert_eq!(d.table.keys, vec![("pk".to_string(), "HASH".to_string())]);

        // Auth off: the authorizer and its function do not exist.
        let d =
            Deployment::read(MINI, &params(&[("Auth", "off"), ("Prefix", "p/")]), names()).unwrap();
        assert!(d.routes["$connect"].authorizer.is_none());
        assert!(!d.functions.contains_key("Auth0"));
        assert_eq!(d.functions["F"].env["MAYBE"], "yes");
        assert_eq!(d.rules[0].sql, "SELECT * FROM 'p/#'");
    }

    #[test]
    fn refuses_what_it_cannot_play() {
        let bad = MINI.replace("IntegrationType: AWS_PROXY", "IntegrationType: HTTP_PROXY");
        let e = Deployment::read(&bad, &params(&[]), names()).unwrap_err();
        assert!(e.0.contains("HTTP_PROXY"), "{e}");
        let bad = MINI.replace("!Ref T", "!ImportValue T");
        let e = Deployment::read(&bad, &params(&[]), names()).unwrap_err();
        assert!(e.0.contains("ImportValue"), "{e}");
        let bad = MINI.replace("$request.body.action", "$request.header.x");
        assert!(Deployment::read(&bad, &params(&[]), names()).is_err());
        let bad = MINI.replace("Runtime: provided.al2023", "Runtime: nodejs20.x");
        assert!(Deployment::read(&bad, &params(&[]), names()).is_err());
    }

    #[test]
    fn parameter_checks_never_echo_a_secret() {
        let p = Parameter {
            kind: "String".into(),
            allowed_pattern: Some("[a-z]+".into()),
            no_echo: true,
            ..Default::default()
        };
        let e = p.check("Secret", "HUNTER2").unwrap_err();
        assert!(!e.0.contains("HUNTER2"), "{e}");
        assert!(p.check("Secret", "abc").is_ok());
        // The pattern must match the whole value.
        assert!(p.check("Secret", "abc1").is_err());
        let n = Parameter {
            kind: "Number".into(),
            min_value: Some(1.0),
            ..Default::default()
        };
        assert!(n.check("N", "0").is_err());
        assert!(n.check("N", "x").is_err());
        assert!(n.check("N", "3").is_ok());
    }

    #[test]
    fn reads_the_projects_template() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../infra/template.yaml"
        ))
        .unwrap();
        let mut p: BTreeMap<String, String> = parameters(&text)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.default.unwrap_or_default()))
            .collect();
        p.insert(
            "IotDataEndpoint".into(),
            "local.iot.us-east-1.amazonaws.com".into(),
        );
        let d = Deployment::read(&text, &p, names()).unwrap();
        let connect = &d.routes["$connect"];
        assert_eq!(d.function(&connect.function).name, "ws-handler");
        assert_eq!(
            d.function(&connect.authorizer.as_ref().unwrap().function)
                .name,
            "ws-authorizer"
        );
        assert!(d.routes["$default"].route_response);
        assert!(!d.routes["$disconnect"].route_response);
        assert_eq!(d.rules.len(), 1);
        assert_eq!(d.function(&d.rules[0].functions[0]).name, "iot-fanout");
        assert_eq!(d.table.ttl_attribute.as_deref(), Some("ttl"));
    }
}
