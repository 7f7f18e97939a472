//! Saga definitions: the data that tells the generic engine which steps a kind of saga has.
//!
//! A definition is a JSON file (see `definitions/order.json`, the built-in default). A new kind of
//! saga needs a definition and its participants; the orchestrator does not change. Loading
//! validates the whole definition and refuses it with a message that names the problem.

use std::{collections::HashSet, path::Path};

use serde::{Deserialize, Serialize};

use crate::schema::{Derive, Schema};
use jetsaga_common::ids::validate_name;

/// The order saga shipped with jetsaga.
pub const BUILTIN_ORDER: &str = include_str!("../definitions/order.json");

/// Retry policy for an action or a compensation: `max_attempts` tries in all, waiting
/// `initial_backoff_ms * multiplier^(n-1)` (capped at `max_backoff_ms`, +/- `jitter` of it) before
/// try n+1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub multiplier: f64,
    /// Fraction (0..=1) of the back-off that is randomised, so retries of many sagas spread out.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff_ms: 200,
            max_backoff_ms: 10_000,
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// Default for compensations, which must eventually succeed: many more tries.
    pub fn compensation_default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            ..Default::default()
        }
    }
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_max_request_bytes() -> usize {
    64 * 1024
}

/// One step: which service runs which action, and how to undo it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    pub name: String,
    pub service: String,
    pub action: String,
    #[serde(default)]
    pub compensation: Option<String>,
    /// How long to wait for a reply before the attempt counts as failed.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default = "RetryPolicy::compensation_default")]
    pub compensation_retry: RetryPolicy,
}

/// A kind of saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// Name of this kind of saga, e.g. `order`.
    pub kind: String,
    /// Subject a client publishes to start one, e.g. `orders.create`.
    pub trigger: String,
    /// Top-level input field whose value is the saga id (and KV key).
    pub key: String,
    /// Requests larger than this are refused.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    pub input: Schema,
    #[serde(default)]
    pub derive: Vec<Derive>,
    pub steps: Vec<StepDef>,
    /// If set, a saga still running this long after it started is aborted and compensated.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
}

/// Why a definition was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read definition {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("definition {origin} is not valid JSON for a definition: {source}")]
    Parse {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("definition {origin}: {problem}")]
    Invalid { origin: String, problem: String },
    #[error("definitions {a} and {b} both use {what}")]
    Clash { a: String, b: String, what: String },
}

fn is_subject(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with("saga.")
        && !s.starts_with("jetsaga.")
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

impl Definition {
    /// Parses and validates a definition from JSON text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, Error> {
        let def: Definition = serde_json::from_str(text).map_err(|source| Error::Parse {
            origin: origin.into(),
            source,
        })?;
        def.check().map_err(|problem| Error::Invalid {
            origin: origin.into(),
            problem,
        })?;
        Ok(def)
    }

    /// Loads a definition file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// The built-in order saga.
    pub fn builtin_order() -> Self {
        Self::from_json(BUILTIN_ORDER, "builtin order").expect("the built-in definition is valid")
    }

    fn check(&self) -> Result<(), String> {
        if !validate_name(&self.kind) {
            return Err(format!(
                "kind {:?} must be 1-32 characters of [a-z0-9_-]",
                self.kind
            ));
        }
        if !is_subject(&self.trigger) {
            return Err(format!(
                "trigger {:?} must be a literal subject (no wildcards) outside saga.> and jetsaga.>",
                self.trigger
            ));
        }
        if !self.input.has_required_id(&self.key) {
            return Err(format!(
                "key {:?} must be a required top-level input field of type \"id\"",
                self.key
            ));
        }
        if self.deadline_ms == Some(0) {
            return Err("deadline_ms must be > 0 when set".into());
        }
        if self.steps.is_empty() {
            return Err("has no steps".into());
        }
        if self.steps.len() > 64 {
            return Err(format!(
                "has {} steps; at most 64 are allowed",
                self.steps.len()
            ));
        }
        let mut names = HashSet::new();
        for (i, s) in self.steps.iter().enumerate() {
            let at = format!("step {i} ({:?})", s.name);
            if s.name.is_empty() || s.name.len() > 64 {
                return Err(format!("{at}: name must be 1-64 characters"));
            }
            if !names.insert(s.name.as_str()) {
                return Err(format!("{at}: name is used twice"));
            }
            if !validate_name(&s.service) {
                return Err(format!(
                    "{at}: service {:?} must be 1-32 characters of [a-z0-9_-]",
                    s.service
                ));
            }
            if !validate_name(&s.action) {
                return Err(format!(
                    "{at}: action {:?} must be 1-32 characters of [a-z0-9_-]",
                    s.action
                ));
            }
            if let Some(c) = &s.compensation {
                if !validate_name(c) {
                    return Err(format!(
                        "{at}: compensation {c:?} must be 1-32 characters of [a-z0-9_-]"
                    ));
                }
                if c == &s.action {
                    return Err(format!("{at}: compensation must differ from the action"));
                }
            }
            if s.timeout_ms == 0 {
                return Err(format!("{at}: timeout_ms must be > 0"));
            }
            for (what, p) in [
                ("retry", &s.retry),
                ("compensation_retry", &s.compensation_retry),
            ] {
                if p.max_attempts == 0 {
                    return Err(format!("{at}: {what}.max_attempts must be >= 1"));
                }
                if !(p.multiplier >= 1.0 && p.multiplier.is_finite()) {
                    return Err(format!("{at}: {what}.multiplier must be >= 1"));
                }
                if !(0.0..=1.0).contains(&p.jitter) {
                    return Err(format!("{at}: {what}.jitter must be within 0..=1"));
                }
                if p.max_backoff_ms < p.initial_backoff_ms {
                    return Err(format!(
                        "{at}: {what}.max_backoff_ms must be >= initial_backoff_ms"
                    ));
                }
            }
        }
        let mut derived = HashSet::new();
        for d in &self.derive {
            if let Schema::Object { fields, .. } = &self.input {
                if fields.contains_key(&d.name) {
                    return Err(format!(
                        "derived field {:?} clashes with an input field",
                        d.name
                    ));
                }
            }
            if !derived.insert(d.name.as_str()) {
                return Err(format!("derived field {:?} is defined twice", d.name));
            }
        }
        Ok(())
    }

    pub fn step(&self, i: u32) -> Option<&StepDef> {
        self.steps.get(i as usize)
    }
}

/// The definitions one orchestrator runs, checked for clashes between them.
#[derive(Debug, Clone)]
pub struct Registry {
    defs: Vec<Definition>,
}

impl Registry {
    pub fn new(defs: Vec<Definition>) -> Result<Self, Error> {
        for (i, a) in defs.iter().enumerate() {
            for b in &defs[i + 1..] {
                if a.kind == b.kind {
                    return Err(Error::Clash {
                        a: a.kind.clone(),
                        b: b.kind.clone(),
                        what: format!("kind {:?}", a.kind),
                    });
                }
                if a.trigger == b.trigger {
                    return Err(Error::Clash {
                        a: a.kind.clone(),
                        b: b.kind.clone(),
                        what: format!("trigger {:?}", a.trigger),
                    });
                }
            }
        }
        Ok(Registry { defs })
    }

    /// Loads the given files, or the built-in order saga if there are none.
    pub fn load(paths: &[std::path::PathBuf]) -> Result<Self, Error> {
        if paths.is_empty() {
            return Self::new(vec![Definition::builtin_order()]);
        }
        let defs = paths
            .iter()
            .map(|p| Definition::load(p))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(defs)
    }

    pub fn by_kind(&self, kind: &str) -> Option<&Definition> {
        self.defs.iter().find(|d| d.kind == kind)
    }

    pub fn by_trigger(&self, subject: &str) -> Option<&Definition> {
        self.defs.iter().find(|d| d.trigger == subject)
    }

    pub fn triggers(&self) -> Vec<String> {
        self.defs.iter().map(|d| d.trigger.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_order_loads() {
        let d = Definition::builtin_order();
        assert_eq!(d.kind, "order");
        let names: Vec<_> = d.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "order.create",
                "payment.deduct",
                "inventory.reserve",
                "order.approve"
            ]
        );
        assert_eq!(d.steps[0].compensation.as_deref(), Some("cancel"));
        assert_eq!(d.steps[3].compensation, None);
    }

    fn with(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Definition, Error> {
        let mut v: serde_json::Value = serde_json::from_str(BUILTIN_ORDER).unwrap();
        edit(&mut v);
        Definition::from_json(&v.to_string(), "test")
    }

    #[test]
    fn rejects_invalid_definitions_clearly() {
        type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["steps"] = serde_json::json!([])),
                "has no steps",
            ),
            (
                Box::new(|v| v["kind"] = "Order".into()),
                "kind \"Order\" must be",
            ),
            (
                Box::new(|v| v["trigger"] = "orders.*".into()),
                "trigger \"orders.*\" must be a literal subject",
            ),
            (
                Box::new(|v| v["trigger"] = "saga.x".into()),
                "outside saga.>",
            ),
            (
                Box::new(|v| v["key"] = "nope".into()),
                "key \"nope\" must be a required",
            ),
            (
                Box::new(|v| v["key"] = "items".into()),
                "key \"items\" must be a required",
            ),
            (
                Box::new(|v| v["steps"][1]["name"] = "order.create".into()),
                "step 1 (\"order.create\"): name is used twice",
            ),
            (
                Box::new(|v| v["steps"][1]["service"] = "pay.ment".into()),
                "service \"pay.ment\" must be",
            ),
            (
                Box::new(|v| v["steps"][1]["compensation"] = "deduct".into()),
                "compensation must differ",
            ),
            (
                Box::new(|v| v["steps"][1]["timeout_ms"] = 0.into()),
                "timeout_ms must be > 0",
            ),
            (
                Box::new(|v| v["steps"][1]["retry"] = serde_json::json!({"max_attempts": 0})),
                "retry.max_attempts must be >= 1",
            ),
            (
                Box::new(|v| v["steps"][1]["retry"] = serde_json::json!({"jitter": 2.0})),
                "retry.jitter must be within",
            ),
            (
                Box::new(|v| v["derive"][0]["name"] = "items".into()),
                "clashes with an input field",
            ),
        ];
        for (edit, want) in cases {
            let err = with(edit).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
        // Unknown fields and wrong types are parse errors that name the field.
        let err = with(|v| v["steps"][0]["retires"] = 3.into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `retires`"), "{err}");
        let err = Definition::from_json("{", "x").unwrap_err().to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn registry_refuses_clashes() {
        let a = Definition::builtin_order();
        let mut b = a.clone();
        b.kind = "order2".into();
        let err = Registry::new(vec![a.clone(), b]).unwrap_err().to_string();
        assert!(err.contains("trigger"), "{err}");
        let err = Registry::new(vec![a.clone(), a]).unwrap_err().to_string();
        assert!(err.contains("kind"), "{err}");
    }
}
