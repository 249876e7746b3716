//! `--key value` arguments, no dependency: the driver is a script.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;

pub struct Args(HashMap<String, String>);

impl Args {
    pub fn parse(argv: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut map = HashMap::new();
        let mut argv = argv.peekable();
        while let Some(key) = argv.next() {
            let Some(name) = key.strip_prefix("--") else {
                return Err(format!("expected --key, got {key}"));
            };
            let value = argv
                .next()
                .ok_or_else(|| format!("--{name} needs a value"))?;
            map.insert(name.to_string(), value);
        }
        Ok(Self(map))
    }

    pub fn get<T: FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{key}: cannot parse {v}")),
        }
    }

    pub fn required<T: FromStr>(&self, key: &str) -> Result<T, String> {
        let v = self
            .0
            .get(key)
            .ok_or_else(|| format!("--{key} is required"))?;
        v.parse().map_err(|_| format!("--{key}: cannot parse {v}"))
    }

    pub fn addr(&self, key: &str) -> Result<SocketAddr, String> {
        self.required(key)
    }

    pub fn opt_str(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}
