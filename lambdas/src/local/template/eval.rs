//! The intrinsic functions of a CloudFormation template (`Ref`,
//! `Fn::Sub`, `Fn::GetAtt`, `Fn::If`, `Fn::Equals`, `Fn::Not`, `Fn::And`,
//! `Fn::Or`, `Fn::Join`, `Fn::Select`, `Condition`), evaluated with the
//! deployment's parameter values and names; anything else is refused, never
//! skipped.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value as Yaml};

use super::{err, function_arn, function_name, scalar, Names, TemplateError};

/// Evaluates intrinsic functions.
pub(super) struct Eval<'a> {
    pub(super) params: &'a BTreeMap<String, String>,
    pub(super) conditions: &'a Mapping,
    pub(super) resources: &'a Mapping,
    pub(super) names: &'a Names,
    /// Conditions evaluated so far (None while one is being evaluated).
    pub(super) memo: RefCell<BTreeMap<String, Option<bool>>>,
}

impl Eval<'_> {
    /// A value with its intrinsic functions evaluated; `None` is
    /// `AWS::NoValue` (or nothing at all).
    pub(super) fn value(&self, v: &Yaml) -> Result<Option<Yaml>, TemplateError> {
        if v.is_null() {
            return Ok(None);
        }
        if let Some((name, arg)) = intrinsic(v) {
            return self.call(&name, arg);
        }
        Ok(Some(match v {
            Yaml::Mapping(m) => {
                let mut out = Mapping::new();
                for (k, v) in m {
                    if let Some(v) = self.value(v)? {
                        out.insert(k.clone(), v);
                    }
                }
                Yaml::Mapping(out)
            }
            Yaml::Sequence(s) => {
                let mut out = Vec::new();
                for v in s {
                    if let Some(v) = self.value(v)? {
                        out.push(v);
                    }
                }
                Yaml::Sequence(out)
            }
            Yaml::Tagged(t) => return err(format!("aws-local does not evaluate {}", t.tag)),
            other => other.clone(),
        }))
    }

    /// A value that must be a scalar, as a string.
    pub(super) fn string(&self, v: &Yaml, context: &str) -> Result<String, TemplateError> {
        self.value(v)?
            .as_ref()
            .and_then(scalar)
            .ok_or_else(|| TemplateError(format!("{context}: expected a string, found {v:?}")))
    }

    pub(super) fn call(&self, name: &str, arg: &Yaml) -> Result<Option<Yaml>, TemplateError> {
        let s = |v: String| Ok(Some(Yaml::String(v)));
        match name {
            "Ref" => {
                let target =
                    scalar(arg).ok_or_else(|| TemplateError("Ref of a non-name".into()))?;
                if target == "AWS::NoValue" {
                    return Ok(None);
                }
                s(self.reference(&target)?)
            }
            "Fn::Sub" => s(self.sub(arg)?),
            "Fn::GetAtt" => {
                let (res, attr) = match arg {
                    Yaml::Sequence(p) if p.len() == 2 => (
                        scalar(&p[0]).unwrap_or_default(),
                        scalar(&p[1]).unwrap_or_default(),
                    ),
                    other => {
                        let text = scalar(other).unwrap_or_default();
                        let (r, a) = text
                            .split_once('.')
                            .ok_or_else(|| TemplateError(format!("GetAtt {text:?}")))?;
                        (r.to_string(), a.to_string())
                    }
                };
                s(self.attribute(&res, &attr)?)
            }
            "Fn::If" => {
                let p = arg
                    .as_sequence()
                    .filter(|p| p.len() == 3)
                    .ok_or_else(|| TemplateError("Fn::If takes [condition, then, else]".into()))?;
                let c = scalar(&p[0]).unwrap_or_default();
                self.value(if self.condition(&c)? { &p[1] } else { &p[2] })
            }
            "Fn::Equals" | "Fn::Not" | "Fn::And" | "Fn::Or" | "Condition" => {
                let b = self.boolean(name, arg)?;
                Ok(Some(Yaml::Bool(b)))
            }
            "Fn::Join" => {
                let p = arg
                    .as_sequence()
                    .filter(|p| p.len() == 2)
                    .ok_or_else(|| TemplateError("Fn::Join takes [separator, list]".into()))?;
                let sep = scalar(&p[0]).unwrap_or_default();
                let list = self.value(&p[1])?.unwrap_or(Yaml::Sequence(vec![]));
                let parts: Vec<String> = list
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .filter_map(scalar)
                    .collect();
                s(parts.join(&sep))
            }
            "Fn::Select" => {
                let p = arg
                    .as_sequence()
                    .filter(|p| p.len() == 2)
                    .ok_or_else(|| TemplateError("Fn::Select takes [index, list]".into()))?;
                let i: usize = self
                    .value(&p[0])?
                    .as_ref()
                    .and_then(scalar)
                    .and_then(|i| i.parse().ok())
                    .ok_or_else(|| TemplateError("Fn::Select index".into()))?;
                let list = self.value(&p[1])?.unwrap_or(Yaml::Sequence(vec![]));
                list.as_sequence()
                    .and_then(|l| l.get(i).cloned())
                    .map(Some)
                    .ok_or_else(|| TemplateError(format!("Fn::Select index {i} out of range")))
            }
            other => err(format!("aws-local does not evaluate {other}")),
        }
    }

    pub(super) fn boolean(&self, name: &str, arg: &Yaml) -> Result<bool, TemplateError> {
        let items = || arg.as_sequence().cloned().unwrap_or_default();
        let each = |v: &Yaml| -> Result<bool, TemplateError> {
            match intrinsic(v) {
                Some((n, a)) => self.boolean(&n, a),
                None => Ok(scalar(v).as_deref() == Some("true")),
            }
        };
        match name {
            "Condition" => self.condition(&scalar(arg).unwrap_or_default()),
            "Fn::Equals" => {
                let p = items();
                if p.len() != 2 {
                    return err("Fn::Equals takes two values");
                }
                let a = self.value(&p[0])?.as_ref().and_then(scalar);
                let b = self.value(&p[1])?.as_ref().and_then(scalar);
                Ok(a == b)
            }
            "Fn::Not" => Ok(!each(
                items()
                    .first()
                    .ok_or_else(|| TemplateError("Fn::Not".into()))?,
            )?),
            "Fn::And" => items().iter().try_fold(true, |acc, v| Ok(acc && each(v)?)),
            "Fn::Or" => items().iter().try_fold(false, |acc, v| Ok(acc || each(v)?)),
            other => err(format!("{other} is not a condition function")),
        }
    }

    pub(super) fn condition(&self, name: &str) -> Result<bool, TemplateError> {
        if let Some(known) = self.memo.borrow().get(name) {
            return known
                .ok_or_else(|| TemplateError(format!("condition {name} refers to itself")));
        }
        let def = self
            .conditions
            .get(name)
            .ok_or_else(|| TemplateError(format!("no condition {name}")))?;
        self.memo.borrow_mut().insert(name.to_string(), None);
        let (f, arg) = intrinsic(def).ok_or_else(|| TemplateError(format!("condition {name}")))?;
        let value = self.boolean(&f, arg)?;
        self.memo.borrow_mut().insert(name.to_string(), Some(value));
        Ok(value)
    }

    pub(super) fn reference(&self, target: &str) -> Result<String, TemplateError> {
        if let Some(v) = self.params.get(target) {
            return Ok(v.clone());
        }
        let n = self.names;
        match target {
            "AWS::Region" => return Ok(n.region.clone()),
            "AWS::AccountId" => return Ok(n.account.clone()),
            "AWS::Partition" => return Ok("aws".into()),
            "AWS::URLSuffix" => return Ok("amazonaws.com".into()),
            "AWS::StackName" => return Ok(n.stack.clone()),
            "AWS::StackId" => {
                return Ok(format!(
                    "arn:aws:cloudformation:{}:{}:stack/{}/local",
                    n.region, n.account, n.stack
                ))
            }
            _ => {}
        }
        let r = self.resources.get(target).ok_or_else(|| {
            TemplateError(format!(
                "Ref to {target}, which is neither a parameter nor a resource"
            ))
        })?;
        Ok(
            match r.get("Type").and_then(Yaml::as_str).unwrap_or_default() {
                "AWS::DynamoDB::Table" => n.table.clone(),
                "AWS::ApiGatewayV2::Api" => n.api_id.clone(),
                "AWS::Serverless::Function" | "AWS::Lambda::Function" => function_name(target, r)?,
                "AWS::SQS::Queue" => format!(
                    "https://sqs.{}.amazonaws.com/{}/{target}",
                    n.region, n.account
                ),
                _ => target.to_string(),
            },
        )
    }

    pub(super) fn attribute(&self, resource: &str, attr: &str) -> Result<String, TemplateError> {
        let n = self.names;
        let r = self.resources.get(resource).ok_or_else(|| {
            TemplateError(format!("GetAtt of {resource}, which is not a resource"))
        })?;
        let kind = r.get("Type").and_then(Yaml::as_str).unwrap_or_default();
        Ok(match (kind, attr) {
            ("AWS::Serverless::Function" | "AWS::Lambda::Function", "Arn") => {
                function_arn(n, &function_name(resource, r)?)
            }
            ("AWS::DynamoDB::Table", "Arn") => {
                format!(
                    "arn:aws:dynamodb:{}:{}:table/{}",
                    n.region, n.account, n.table
                )
            }
            ("AWS::SQS::Queue", "QueueName") => resource.to_string(),
            ("AWS::SQS::Queue", "Arn") => {
                format!("arn:aws:sqs:{}:{}:{resource}", n.region, n.account)
            }
            ("AWS::Logs::LogGroup", "Arn") => format!(
                "arn:aws:logs:{}:{}:log-group:{resource}:*",
                n.region, n.account
            ),
            ("AWS::IAM::Role", "Arn") => format!("arn:aws:iam::{}:role/{resource}", n.account),
            ("AWS::IoT::TopicRule", "Arn") => {
                format!("arn:aws:iot:{}:{}:rule/{resource}", n.region, n.account)
            }
            _ => format!("arn:aws:local:{}:{}:{resource}/{attr}", n.region, n.account),
        })
    }

    pub(super) fn sub(&self, arg: &Yaml) -> Result<String, TemplateError> {
        let (text, vars) = match arg {
            Yaml::Sequence(p) if p.len() == 2 => (
                scalar(&p[0]).unwrap_or_default(),
                p[1].as_mapping().cloned().unwrap_or_default(),
            ),
            other => (
                scalar(other).ok_or_else(|| TemplateError("Fn::Sub of a non-string".into()))?,
                Mapping::new(),
            ),
        };
        let mut out = String::new();
        let mut rest = text.as_str();
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| TemplateError(format!("Fn::Sub: unclosed ${{ in {text:?}")))?;
            let name = &after[..end];
            if let Some(literal) = name.strip_prefix('!') {
                out.push_str("${");
                out.push_str(literal);
                out.push('}');
            } else if let Some(v) = vars.get(name) {
                out.push_str(&self.string(v, name)?);
            } else if let Some((res, attr)) = name.split_once('.') {
                if self.params.contains_key(name) || name.starts_with("AWS::") {
                    out.push_str(&self.reference(name)?);
                } else {
                    out.push_str(&self.attribute(res, attr)?);
                }
            } else {
                out.push_str(&self.reference(name)?);
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// `!Ref x` / `{Ref: x}` / `!Sub ...` / `{"Fn::Sub": ...}` → (long name, argument).
fn intrinsic(v: &Yaml) -> Option<(String, &Yaml)> {
    match v {
        Yaml::Tagged(t) => {
            let tag = t.tag.to_string();
            let short = tag.trim_start_matches('!');
            let name = match short {
                "Ref" | "Condition" => short.to_string(),
                other => format!("Fn::{other}"),
            };
            Some((name, &t.value))
        }
        Yaml::Mapping(m) if m.len() == 1 => {
            let (k, arg) = m.iter().next()?;
            let k = k.as_str()?;
            (k == "Ref" || k == "Condition" || k.starts_with("Fn::")).then(|| (k.to_string(), arg))
        }
        _ => None,
    }
}
