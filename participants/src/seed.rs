//! Seed data for the example services, read from a JSON file:
//! `{"customers": {"c-1": 100000}, "stock": {"sku-1": 100}}` (balances in cents). Each service
//! takes the part it owns and applies it with `INSERT OR IGNORE` at every start, so a restart
//! never resets a balance or a stock level that sagas have changed.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Seed {
    /// Customer id -> opening balance in cents (payment).
    pub customers: BTreeMap<String, i64>,
    /// SKU -> units in stock (inventory).
    pub stock: BTreeMap<String, i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read seed file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("seed file {path} is not valid: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("seed file {path}: {what} {key:?} has a negative value {value}")]
    Negative {
        path: String,
        what: &'static str,
        key: String,
        value: i64,
    },
}

impl Seed {
    /// Reads and checks a seed file.
    pub fn load(path: &Path) -> Result<Seed, Error> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: shown.clone(),
            source,
        })?;
        let seed: Seed = serde_json::from_str(&text).map_err(|source| Error::Parse {
            path: shown.clone(),
            source,
        })?;
        for (what, map) in [("customer", &seed.customers), ("sku", &seed.stock)] {
            if let Some((key, value)) = map.iter().find(|(_, v)| **v < 0) {
                return Err(Error::Negative {
                    path: shown,
                    what,
                    key: key.clone(),
                    value: *value,
                });
            }
        }
        Ok(seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_seed_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("seed/default.json");
        let seed = Seed::load(&path).unwrap();
        assert_eq!(seed.customers["c-2"], 500);
        assert_eq!(seed.stock["sku-3"], 1);
        assert_eq!(seed.customers.len(), 3);
    }

    #[test]
    fn unknown_keys_and_negatives_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        std::fs::write(&p, r#"{"customer": {}}"#).unwrap();
        assert!(matches!(Seed::load(&p), Err(Error::Parse { .. })));
        std::fs::write(&p, r#"{"stock": {"x": -1}}"#).unwrap();
        assert!(matches!(Seed::load(&p), Err(Error::Negative { .. })));
    }
}
