//! A small, declarative input schema that saga definitions carry, so the orchestrator can refuse a
//! bad request (and dead-letter it with a precise reason) without knowing any business.
//!
//! It is deliberately tiny: ids, integers with bounds, strings, booleans, arrays with length
//! bounds and objects whose fields are all required and whose unknown fields are refused unless
//! allowed. Derived fields (`sum_of_products`) compute values such as an order's amount with
//! checked arithmetic, so an overflow is a validation error, not a wrapped number.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One node of an input schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schema {
    /// A string that is a valid saga id / KV key / subject token (see `jetsaga_common::ids`).
    Id,
    String {
        #[serde(default)]
        min_len: usize,
        #[serde(default = "default_max_len")]
        max_len: usize,
    },
    Integer {
        #[serde(default)]
        min: Option<i64>,
        #[serde(default)]
        max: Option<i64>,
    },
    Boolean,
    Array {
        items: Box<Schema>,
        #[serde(default)]
        min_items: usize,
        #[serde(default = "default_max_items")]
        max_items: usize,
    },
    Object {
        fields: BTreeMap<String, Schema>,
        /// Fields that may be absent.
        #[serde(default)]
        optional: Vec<String>,
        /// Accept fields the schema does not name (refused by default: a typo is caught early).
        #[serde(default)]
        allow_unknown: bool,
    },
}

fn default_max_len() -> usize {
    1024
}
fn default_max_items() -> usize {
    1000
}

/// A value computed from the validated input and added to it under `name`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Derive {
    pub name: String,
    pub sum_of_products: SumOfProducts,
}

/// `sum over input[array] of product of item[fields]`, in checked i64 arithmetic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SumOfProducts {
    pub array: String,
    pub fields: Vec<String>,
}

/// Why a request does not fit its schema; `path` points at the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct Invalid {
    pub path: String,
    pub message: String,
}

fn invalid(path: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        path: if path.is_empty() {
            "$".into()
        } else {
            path.into()
        },
        message: message.into(),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Schema {
    /// Checks `value` against the schema.
    pub fn validate(&self, value: &Value) -> Result<(), Invalid> {
        self.check(value, "")
    }

    fn check(&self, value: &Value, path: &str) -> Result<(), Invalid> {
        match self {
            Schema::Id => {
                let s = value.as_str().ok_or_else(|| {
                    invalid(path, format!("must be a string, got {}", type_name(value)))
                })?;
                jetsaga_common::ids::validate(s).map_err(|e| invalid(path, e.to_string()))
            }
            Schema::String { min_len, max_len } => {
                let s = value.as_str().ok_or_else(|| {
                    invalid(path, format!("must be a string, got {}", type_name(value)))
                })?;
                let n = s.chars().count();
                if n < *min_len || n > *max_len {
                    return Err(invalid(
                        path,
                        format!("must be {min_len}..={max_len} characters long, got {n}"),
                    ));
                }
                Ok(())
            }
            Schema::Integer { min, max } => {
                let n = value.as_i64().ok_or_else(|| {
                    if value.is_number() {
                        invalid(
                            path,
                            format!("must be an integer in i64 range, got {value}"),
                        )
                    } else {
                        invalid(
                            path,
                            format!("must be an integer, got {}", type_name(value)),
                        )
                    }
                })?;
                if let Some(min) = min {
                    if n < *min {
                        return Err(invalid(path, format!("must be >= {min}, got {n}")));
                    }
                }
                if let Some(max) = max {
                    if n > *max {
                        return Err(invalid(path, format!("must be <= {max}, got {n}")));
                    }
                }
                Ok(())
            }
            Schema::Boolean => match value {
                Value::Bool(_) => Ok(()),
                _ => Err(invalid(
                    path,
                    format!("must be a boolean, got {}", type_name(value)),
                )),
            },
            Schema::Array {
                items,
                min_items,
                max_items,
            } => {
                let arr = value.as_array().ok_or_else(|| {
                    invalid(path, format!("must be an array, got {}", type_name(value)))
                })?;
                if arr.len() < *min_items {
                    return Err(invalid(
                        path,
                        format!("must have at least {min_items} item(s), got {}", arr.len()),
                    ));
                }
                if arr.len() > *max_items {
                    return Err(invalid(
                        path,
                        format!("must have at most {max_items} items, got {}", arr.len()),
                    ));
                }
                for (i, v) in arr.iter().enumerate() {
                    items.check(v, &format!("{path}[{i}]"))?;
                }
                Ok(())
            }
            Schema::Object {
                fields,
                optional,
                allow_unknown,
            } => {
                let obj = value.as_object().ok_or_else(|| {
                    invalid(path, format!("must be an object, got {}", type_name(value)))
                })?;
                let join = |k: &str| {
                    if path.is_empty() {
                        k.to_string()
                    } else {
                        format!("{path}.{k}")
                    }
                };
                for (name, schema) in fields {
                    match obj.get(name) {
                        Some(v) => schema.check(v, &join(name))?,
                        None if optional.iter().any(|o| o == name) => {}
                        None => return Err(invalid(&join(name), "is missing")),
                    }
                }
                if !allow_unknown {
                    if let Some(k) = obj.keys().find(|k| !fields.contains_key(*k)) {
                        return Err(invalid(&join(k), "is not a known field"));
                    }
                }
                Ok(())
            }
        }
    }

    /// Whether `field` is a required top-level field of type `id` (what a saga key must be).
    pub fn has_required_id(&self, field: &str) -> bool {
        match self {
            Schema::Object {
                fields, optional, ..
            } => {
                matches!(fields.get(field), Some(Schema::Id))
                    && !optional.iter().any(|o| o == field)
            }
            _ => false,
        }
    }
}

impl Derive {
    /// Computes the derived value from an input that passed validation.
    pub fn compute(&self, input: &Value) -> Result<Value, Invalid> {
        let SumOfProducts { array, fields } = &self.sum_of_products;
        let items = input
            .get(array)
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(array, "must be an array"))?;
        let mut total: i64 = 0;
        for (i, item) in items.iter().enumerate() {
            let mut product: i64 = 1;
            for f in fields {
                let n = item
                    .get(f)
                    .and_then(Value::as_i64)
                    .ok_or_else(|| invalid(&format!("{array}[{i}].{f}"), "must be an integer"))?;
                product = product
                    .checked_mul(n)
                    .ok_or_else(|| invalid(&self.name, format!("overflows at {array}[{i}]")))?;
            }
            total = total
                .checked_add(product)
                .ok_or_else(|| invalid(&self.name, format!("overflows at {array}[{i}]")))?;
        }
        Ok(Value::from(total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn order_schema() -> Schema {
        crate::definition::Definition::builtin_order().input
    }

    #[test]
    fn accepts_a_good_order() {
        let v = json!({"order_id":"o-1","customer_id":"c-1","items":[{"sku":"sku-1","quantity":2,"unit_price_cents":1250}]});
        assert_eq!(order_schema().validate(&v), Ok(()));
    }

    #[test]
    fn rejects_bad_orders_with_a_path() {
        let item = || json!({"sku":"s","quantity":1,"unit_price_cents":1});
        let cases = [
            (json!([1]), "$: must be an object, got an array"),
            (
                json!({"customer_id":"c","items":[item()]}),
                "order_id: is missing",
            ),
            (
                json!({"order_id":5,"customer_id":"c","items":[item()]}),
                "order_id: must be a string, got a number",
            ),
            (
                json!({"order_id":"a.b","customer_id":"c","items":[item()]}),
                "order_id: id contains '.'; only A-Z, a-z, 0-9, '_' and '-' are allowed",
            ),
            (
                json!({"order_id":"","customer_id":"c","items":[item()]}),
                "order_id: id is empty",
            ),
            (
                json!({"order_id":"o","items":[item()]}),
                "customer_id: is missing",
            ),
            (
                json!({"order_id":"o","customer_id":"c"}),
                "items: is missing",
            ),
            (
                json!({"order_id":"o","customer_id":"c","items":{}}),
                "items: must be an array, got an object",
            ),
            (
                json!({"order_id":"o","customer_id":"c","items":[]}),
                "items: must have at least 1 item(s), got 0",
            ),
            (
                json!({"order_id":"o","customer_id":"c","items":[{"sku":"s","quantity":0,"unit_price_cents":1}]}),
                "items[0].quantity: must be >= 1, got 0",
            ),
            (
                json!({"order_id":"o","customer_id":"c","items":[{"sku":"s","quantity":-3,"unit_price_cents":1}]}),
                "items[0].quantity: must be >= 1, got -3",
            ),
            (
                json!({"order_id":"o","customer_id":"c","items":[{"sku":"s","quantity":10001,"unit_price_cents":1}]}),
                "items[0].quantity: must be <= 10000, got 10001",
            ),
            (
                json!({"order_id":"o","customer_id":"c","items":[{"sku":"s","quantity":1.5,"unit_price_cents":1}]}),
                "items[0].quantity: must be an integer in i64 range, got 1.5",
            ),
            (
                json!({"order_id":"o","customer_id":"c","items":[{"sku":"s","quantity":"2","unit_price_cents":1}]}),
                "items[0].quantity: must be an integer, got a string",
            ),
            (
                json!({"order_id":"o","customer_id":"c","items":[{"sku":"s","quantity":1,"unit_price_cents":-1}]}),
                "items[0].unit_price_cents: must be >= 0, got -1",
            ),
            (
                json!({"order_id":"o","customer_id":"c","items":[{"sku":"s","quantity":1}]}),
                "items[0].unit_price_cents: is missing",
            ),
            (
                json!({"order_id":"o","customer_id":"c","items":[], "extra": 1}),
                "items: must have at least 1 item(s), got 0",
            ),
            (
                json!({"order_id":"o","customer_id":"c","items":[{"sku":"s","quantity":1,"unit_price_cents":1}], "extra": 1}),
                "extra: is not a known field",
            ),
        ];
        for (v, want) in cases {
            let got = order_schema().validate(&v).unwrap_err().to_string();
            assert_eq!(got, want, "for {v}");
        }
        let many: Vec<Value> = (0..101)
            .map(|_| json!({"sku":"s","quantity":1,"unit_price_cents":1}))
            .collect();
        let v = json!({"order_id":"o","customer_id":"c","items": many});
        assert_eq!(
            order_schema().validate(&v).unwrap_err().to_string(),
            "items: must have at most 100 items, got 101"
        );
    }

    #[test]
    fn derives_amount_with_overflow_check() {
        let d = &crate::definition::Definition::builtin_order().derive[0];
        let v = json!({"items":[{"quantity":2,"unit_price_cents":1250},{"quantity":3,"unit_price_cents":1}]});
        assert_eq!(d.compute(&v), Ok(json!(2503)));
        let v = json!({"items":[{"quantity":10000,"unit_price_cents":i64::MAX / 2}]});
        assert_eq!(
            d.compute(&v).unwrap_err().to_string(),
            "amount_cents: overflows at items[0]"
        );
        let v = json!({"items":[{"quantity":1,"unit_price_cents":i64::MAX},{"quantity":1,"unit_price_cents":1}]});
        assert_eq!(
            d.compute(&v).unwrap_err().to_string(),
            "amount_cents: overflows at items[1]"
        );
    }
}
