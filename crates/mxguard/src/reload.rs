//! Reloading the configuration. SIGHUP and `POST /api/v1/reload` take
//! this one path: parse and validate everything first (the config file,
//! the token file, the event log's file), swap only when all of it is
//! good (Stalwart's habit), then re-read the list files. A bad reload
//! leaves the running state in place and says why.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::api::Tokens;
use crate::config::{Config, Overrides};
use crate::events::AdminEvent;
use crate::lists::ListFiles;
use crate::server::{Runtime, Shared};

/// Where the running configuration came from, so it can be read again.
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
}

#[derive(Debug, Serialize)]
pub struct ReloadReport {
    pub reloaded: bool,
    /// The file read; absent when running on built-in defaults.
    pub file: Option<String>,
    /// Changes that wait for a restart, and other things worth knowing.
    pub warnings: Vec<String>,
}

/// The admin token file, or no tokens when none is configured.
pub fn load_tokens(config: &Config) -> Result<Tokens, String> {
    match &config.admin.token_file {
        Some(path) => Tokens::load(path),
        None => Ok(Tokens::disabled()),
    }
}

impl Shared {
    /// Remembers where the config came from (once, at start).
    pub fn set_config_source(&self, path: Option<PathBuf>, overrides: Overrides) {
        let _ = self.config_source.set(ConfigSource { path, overrides });
    }

    /// Reloads; `who` and `via` go to the event log.
    pub fn reload(&self, who: &str, via: &str) -> Result<ReloadReport, String> {
        crate::notify::notify("RELOADING=1");
        let result = self.reload_config();
        crate::notify::notify("READY=1");
        let (outcome, detail) = match &result {
            Ok(report) => ("ok", report.warnings.join("; ")),
            Err(e) => ("error", e.clone()),
        };
        self.events.admin(&AdminEvent {
            who,
            via,
            action: "reload",
            target: None,
            result: outcome,
            detail: (!detail.is_empty()).then_some(detail.as_str()),
        });
        result
    }

    fn reload_config(&self) -> Result<ReloadReport, String> {
        let running = self.runtime.load_full();
        // Rotation must work even when the new config is broken: the
        // event log is reopened first, at the path in use.
        if let Err(e) = self.events.configure(running.config.log.events.as_deref()) {
            tracing::warn!("event log: {e}");
        }
        let Some(ConfigSource {
            path: Some(path),
            overrides,
        }) = self.config_source.get()
        else {
            tracing::info!("reload: running on built-in defaults, nothing to reload");
            return Ok(ReloadReport {
                reloaded: false,
                file: None,
                warnings: vec!["running on built-in defaults: no file to reload".into()],
            });
        };
        let prepared = Config::load(Some(path), overrides)
            .map_err(|e| e.to_string())
            .and_then(|new| {
                let tokens = load_tokens(&new)?;
                self.events
                    .configure(new.log.events.as_deref())
                    .map_err(|e| format!("log.events: {e}"))?;
                Ok((new, tokens))
            });
        let (mut new, tokens) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.metrics.reload_result(false);
                tracing::error!("reload failed, keeping the running config: {e}");
                // The list files are re-read all the same: SIGHUP is also
                // how an operator says "I edited a list".
                let _ = self.reload_lists();
                return Err(e);
            }
        };

        let old = &running.config;
        let mut warnings = Vec::new();
        let needs_restart = [
            (
                "limits.blocklist_max",
                old.limits.blocklist_max != new.limits.blocklist_max,
            ),
            (
                "pass_cache.max_entries",
                old.pass_cache.max_entries != new.pass_cache.max_entries,
            ),
            (
                "intercept.listen",
                old.intercept.listen != new.intercept.listen,
            ),
            ("intercept.mode", old.intercept.mode != new.intercept.mode),
            ("sk_lookup", old.sk_lookup != new.sk_lookup),
            (
                "intercept.workers",
                old.intercept.workers != new.intercept.workers,
            ),
            ("admin.listen", old.admin.listen != new.admin.listen),
            ("log.format", old.log.format != new.log.format),
            ("log.level", old.log.level != new.log.level),
        ];
        for (key, changed) in needs_restart {
            if changed {
                tracing::warn!("reload: `{key}` changed; it takes effect at restart");
                warnings.push(format!("`{key}` changed; it takes effect at restart"));
            }
        }
        // The listeners were bound for the running mode and addresses:
        // sessions must go on reading their destination the way those
        // listeners deliver it until a restart.
        new.intercept.mode = old.intercept.mode;
        new.intercept.listen = old.intercept.listen.clone();
        new.intercept.workers = old.intercept.workers;
        if new.uses_quarantine() && self.quarantine.is_none() {
            let w = "quarantine is now an action but its store opens at start: restart to use it (until then such mail gets 451)";
            tracing::warn!("reload: {w}");
            warnings.push(w.into());
        }
        let files = ListFiles::from_config(&new);
        self.runtime.store(Arc::new(Runtime::new(new)));
        self.tokens.store(Arc::new(tokens));
        match self.lists.load_files(&files) {
            Ok(n) => {
                tracing::info!("lists: {n} entries from the list files");
                self.lists_changed();
            }
            Err(e) => {
                tracing::error!("lists: reload failed, keeping the old lists: {e}");
                warnings.push(format!("lists: {e}; the old lists are kept"));
            }
        }
        self.metrics.reload_result(true);
        tracing::info!("reloaded {}", path.display());
        Ok(ReloadReport {
            reloaded: true,
            file: Some(path.display().to_string()),
            warnings,
        })
    }
}
