//! The configuration: one serde tree, defaults in one place.
//!
//! Parsing is strict (`deny_unknown_fields`) and every error names the file
//! and the key, so a typo never silently runs on a default. A reload parses
//! and validates the whole file before anything is swapped (Stalwart's
//! habit): a bad file leaves the running configuration in place.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use mxguard_policy::action::Action;
use mxguard_policy::PregreetAction;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written like `6s`, `500ms`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }
}

impl std::str::FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| format!("bad duration `{s}` ({e}); write it like 6s, 500ms, 1h"))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            return f.write_str("0s");
        }
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How the guard learns where a connection was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Listen and forward to one configured upstream.
    Fixed,
    /// Behind iptables REDIRECT: SO_ORIGINAL_DST.
    Redirect,
    /// Behind iptables TPROXY: the accepted socket's local address.
    Tproxy,
    /// Steered by the guard's own BPF `sk_lookup` program (`[sk_lookup]`):
    /// the accepted socket's local address, no NAT.
    #[serde(rename = "sk_lookup")]
    #[value(name = "sk_lookup")]
    SkLookup,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fixed => "fixed",
            Self::Redirect => "redirect",
            Self::Tproxy => "tproxy",
            Self::SkLookup => "sk_lookup",
        }
    }
}

/// When to open the upstream connection during the greet delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamConnect {
    /// `connect_lead` before the delay ends: an early talker never touches
    /// the MTA, and a held session costs one descriptor.
    Lazy,
    /// At accept.
    Eager,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    Splice,
    Copy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Our name in the replies we write ourselves (challenge, 421, 554).
    pub hostname: String,
    pub intercept: Intercept,
    pub greet: Greet,
    pub pregreet: Pregreet,
    pub relay: Relay,
    pub turns: Turns,
    pub actions: Actions,
    pub pass_cache: PassCache,
    pub allowlist: Allowlist,
    pub lists: ListsConfig,
    pub limits: Limits,
    pub admin: Admin,
    pub log: Log,
    pub quarantine: Quarantine,
    pub admission: crate::admission_config::Admission,
    pub reputation: crate::admission_config::Reputation,
    pub alert: crate::admission_config::Alert,
    pub senders: crate::admission_config::Senders,
    pub state: crate::admission_config::State,
    pub cluster: crate::admission_config::Cluster,
    pub nftables: crate::admission_config::Nftables,
    pub sk_lookup: SkLookup,
}

/// What the guard's `sk_lookup` program steers (`intercept.mode =
/// "sk_lookup"`, the guard on the MTA's host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SkLookup {
    /// Destination ports whose new connections go to the guard.
    pub ports: Vec<u16>,
    /// Interfaces whose connections are steered; empty: every interface.
    pub interfaces: Vec<String>,
    /// A client that passed makes its next connections to the MTA itself,
    /// without the guard, for the pass's TTL.
    pub bypass_passed: bool,
    /// The kernel's copy of the pass cache holds this many addresses per
    /// family, the most recently used (the kernel allocates it whole at
    /// start, ~80 bytes an entry); a pass it dropped is still in the
    /// guard's cache, so that client's next session is not delayed.
    pub bypass_entries: u32,
}

impl Default for SkLookup {
    fn default() -> Self {
        Self {
            ports: vec![25],
            interfaces: Vec::new(),
            bypass_passed: false,
            bypass_entries: 65_536,
        }
    }
}

/// How long the guard watches a session after its greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Watch {
    /// Every command, until STARTTLS or the end (copy mode until then).
    Session,
    /// Splice right after the greeting: only the greeting is tested.
    Greeting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Smuggling {
    /// Refuse the message (554) and end the session.
    Reject,
    /// Rewrite look-alikes into unambiguous content and carry on.
    Normalize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Turns {
    pub watch: Watch,
    /// Hide PIPELINING from clients: any pipelining is then a violation.
    pub strip_pipelining: bool,
    pub max_command_line: usize,
    pub unknown_command_limit: u32,
    pub smuggling: Smuggling,
    pub reply_delay: ReplyDelay,
}

/// The longest a reply may be held (`turns.reply_delay.*`). RFC 5321
/// §4.5.3.2 has clients wait 5 minutes for most replies but only 2 for the
/// `354` to DATA, and many give up sooner; postscreen's and greylisting's
/// pauses are seconds. Half the shortest RFC timeout leaves room for the
/// MTA's own time; beyond it a value is a typo (`"10m"` for `"10s"`).
pub const MAX_REPLY_DELAY: Duration = Duration::from_secs(60);

/// How long to hold the MTA's reply to each command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplyDelay {
    pub ehlo: Dur,
    pub helo: Dur,
    pub mail: Dur,
    pub rcpt: Dur,
    /// The 354 to DATA.
    pub data: Dur,
    /// The reply to the end of a message.
    pub end_of_data: Dur,
    pub other: Dur,
}

/// What each test does when it fires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Actions {
    pub pipelining: Action,
    pub early_data: Action,
    pub non_smtp: Action,
    pub tls_on_plaintext: Action,
    pub bare_lf: Action,
    pub long_line: Action,
    pub unknown_commands: Action,
    pub smuggling: Action,
    pub starttls_injection: Action,
    /// Clients rejected or dropped by a test after the greeting are
    /// blocklisted this long (0s: never).
    pub block_ttl: Dur,
    /// The header name `tag` adds.
    pub tag_header: String,
    /// How much `tarpit` slows each reply.
    pub tarpit_delay: Dur,
}

impl Actions {
    /// The action for a test by its name (as [`mxguard_smtp::Violation::test`]).
    pub fn for_test(&self, test: &str) -> Action {
        match test {
            "pipelining" => self.pipelining,
            "early-data" => self.early_data,
            "non-smtp" => self.non_smtp,
            "tls-on-plaintext" => self.tls_on_plaintext,
            "bare-lf" => self.bare_lf,
            "long-line" => self.long_line,
            "unknown-commands" => self.unknown_commands,
            "smuggling" => self.smuggling,
            "starttls-injection" => self.starttls_injection,
            _ => Action::Observe,
        }
    }
}

/// Clients that passed every test are remembered and not delayed again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassCache {
    /// How long a pass is remembered (0s: never).
    pub ttl: Dur,
    pub max_entries: usize,
}

/// Networks that skip every test: no delay, no watch, spliced at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Allowlist {
    pub networks: Vec<IpNet>,
}

/// Allow and block CIDR files (docs/limits.md): one prefix or address a
/// line, `#` comments. Re-read on SIGHUP and when a file changes; a bad
/// file keeps the lists in force and the error names the file and line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListsConfig {
    pub allow_files: Vec<PathBuf>,
    pub block_files: Vec<PathBuf>,
    /// How often the files' modification times are checked (0s: only on
    /// SIGHUP).
    pub watch_interval: Dur,
}

/// More session threads than this is a typo, not a machine.
pub const MAX_WORKERS: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Intercept {
    pub mode: Mode,
    pub listen: Vec<SocketAddr>,
    /// The MTA in `fixed` mode.
    pub upstream: SocketAddr,
    /// `tproxy` only: connect to the MTA from the client's own address.
    pub transparent_upstream: bool,
    pub upstream_connect_timeout: Dur,
    /// Threads that accept and serve sessions, each with its own listening
    /// socket per address (`SO_REUSEPORT`); 0: one per CPU.
    pub workers: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Greet {
    pub delay: Dur,
    pub challenge: bool,
    pub upstream_connect: UpstreamConnect,
    pub connect_lead: Dur,
    pub banner_timeout: Dur,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pregreet {
    pub action: PregreetAction,
    pub block_ttl: Dur,
    pub capture: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Relay {
    pub mode: RelayMode,
    pub idle_timeout: Dur,
    pub command_timeout: Dur,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub drain_timeout: Dur,
    pub blocklist_max: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// `""` disables the admin listener.
    #[serde(with = "optional_addr")]
    pub listen: Option<SocketAddr>,
    /// Bearer tokens for the API, one per line (`NAME:SECRET`, or a bare
    /// `SECRET` named `admin`). Unset: the `/api/v1` routes and `/readyz`
    /// are off; only `/healthz` and `/metrics` answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Where `/readyz` checks that the MTA answers a TCP connect. Unset:
    /// `intercept.upstream` in fixed mode; no check in the other modes.
    #[serde(
        with = "optional_addr",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub ready_probe: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    /// A tracing filter: `info`, `debug`, `mxguard=debug,warn`.
    pub level: String,
    /// The JSON-lines event log (one line per verdict and per admin
    /// action). Unset: no event log. Reopened on SIGHUP (rotation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<PathBuf>,
}

/// Where `quarantine` keeps suspect mail (docs/quarantine.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quarantine {
    /// Holds `tmp/` (messages being written) and `new/` (stored ones).
    pub dir: PathBuf,
    /// Bytes. A bigger message is answered `552` and not stored.
    pub max_message_size: u64,
}

// The defaults, all in one place.

impl Default for Config {
    fn default() -> Self {
        Self {
            hostname: system_hostname(),
            intercept: Intercept::default(),
            greet: Greet::default(),
            pregreet: Pregreet::default(),
            relay: Relay::default(),
            turns: Turns::default(),
            actions: Actions::default(),
            pass_cache: PassCache::default(),
            allowlist: Allowlist::default(),
            lists: ListsConfig::default(),
            limits: Limits::default(),
            admin: Admin::default(),
            log: Log::default(),
            quarantine: Quarantine::default(),
            admission: Default::default(),
            reputation: Default::default(),
            alert: Default::default(),
            senders: Default::default(),
            state: Default::default(),
            cluster: Default::default(),
            nftables: Default::default(),
            sk_lookup: SkLookup::default(),
        }
    }
}

impl Default for ListsConfig {
    fn default() -> Self {
        Self {
            allow_files: Vec::new(),
            block_files: Vec::new(),
            watch_interval: Dur::secs(2),
        }
    }
}

impl Default for Intercept {
    fn default() -> Self {
        Self {
            mode: Mode::Fixed,
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 25))],
            upstream: SocketAddr::from(([127, 0, 0, 1], 10025)),
            transparent_upstream: false,
            upstream_connect_timeout: Dur::secs(10),
            workers: 0,
        }
    }
}

impl Default for Greet {
    fn default() -> Self {
        Self {
            delay: Dur::secs(6),
            challenge: true,
            upstream_connect: UpstreamConnect::Lazy,
            connect_lead: Dur::secs(1),
            banner_timeout: Dur::secs(30),
        }
    }
}

impl Default for Pregreet {
    fn default() -> Self {
        Self {
            action: PregreetAction::Reject,
            block_ttl: Dur::secs(3600),
            capture: 100,
        }
    }
}

impl Default for Relay {
    fn default() -> Self {
        Self {
            mode: RelayMode::Splice,
            idle_timeout: Dur::secs(300),
            command_timeout: Dur::secs(300),
        }
    }
}

impl Default for Turns {
    fn default() -> Self {
        Self {
            watch: Watch::Session,
            strip_pipelining: false,
            // Postfix's own line_length_limit: RFC 5321's 512 plus room for
            // the parameters extensions add to MAIL FROM.
            max_command_line: 2048,
            unknown_command_limit: 3,
            smuggling: Smuggling::Reject,
            reply_delay: ReplyDelay::default(),
        }
    }
}

impl ReplyDelay {
    /// Each delay with its key's last part.
    fn each(&self) -> [(&'static str, Dur); 7] {
        [
            ("ehlo", self.ehlo),
            ("helo", self.helo),
            ("mail", self.mail),
            ("rcpt", self.rcpt),
            ("data", self.data),
            ("end_of_data", self.end_of_data),
            ("other", self.other),
        ]
    }
}

impl Default for ReplyDelay {
    fn default() -> Self {
        Self {
            ehlo: Dur::secs(0),
            helo: Dur::secs(0),
            mail: Dur::secs(0),
            rcpt: Dur::secs(0),
            data: Dur::secs(0),
            end_of_data: Dur::secs(0),
            other: Dur::secs(0),
        }
    }
}

impl Default for Actions {
    fn default() -> Self {
        Self {
            pipelining: Action::Reject,
            early_data: Action::Reject,
            non_smtp: Action::Drop,
            // A real sender that expected implicit TLS: it cannot read an
            // SMTP reply, and it is not a bot to blocklist.
            tls_on_plaintext: Action::Drop,
            bare_lf: Action::Observe,
            long_line: Action::Reject,
            unknown_commands: Action::Reject,
            smuggling: Action::Reject,
            starttls_injection: Action::Reject,
            block_ttl: Dur::secs(3600),
            tag_header: "X-MXGuard".into(),
            tarpit_delay: Dur::secs(10),
        }
    }
}

impl Default for PassCache {
    fn default() -> Self {
        Self {
            ttl: Dur::secs(24 * 3600),
            max_entries: 1_000_000,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            drain_timeout: Dur::secs(30),
            blocklist_max: 1_000_000,
        }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9425))),
            token_file: None,
            ready_probe: None,
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            events: None,
        }
    }
}

impl Default for Quarantine {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/mxguard/quarantine"),
            // Beyond what most MTAs accept (Postfix: 10 MB by default), so
            // the guard is never the one refusing a legitimate size.
            max_message_size: 50 * 1024 * 1024,
        }
    }
}

fn system_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| valid_hostname(h))
        .unwrap_or_else(|| "localhost".into())
}

/// Our hostname goes into SMTP reply lines: no spaces, no line breaks.
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b))
}

mod optional_addr {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Ok(None);
        }
        s.trim()
            .parse()
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("bad socket address `{s}` ({e})")))
    }
}

/// A configuration problem, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}: ", file.display())?,
            None => f.write_str("command line: ")?,
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "key `{}`: {}", self.key, self.message)
        }
    }
}

/// Settings given on the command line; they win over the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// Address to listen on (repeatable); replaces `intercept.listen`.
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,
    /// fixed | redirect | tproxy | sk_lookup
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// The MTA in fixed mode.
    #[arg(long, value_name = "ADDR")]
    pub upstream: Option<SocketAddr>,
    /// How long to hold the greeting, e.g. 6s, 500ms, 0s.
    #[arg(long, value_name = "DURATION")]
    pub greet_delay: Option<Dur>,
    /// observe | tag | tarpit | quarantine | discard | tempfail | reject | drop
    #[arg(long, value_name = "ACTION")]
    pub pregreet_action: Option<PregreetAction>,
    /// Admin listener address ("" disables).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// text | json
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

impl Config {
    /// Reads `file` (or the defaults when `None`), applies the overrides and
    /// validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    file: Some(path.to_owned()),
                    key: String::new(),
                    message: format!("cannot read: {e}"),
                })?;
                Self::parse(&text).map_err(|mut e| {
                    e.file = Some(path.to_owned());
                    e
                })?
            }
            None => Self::default(),
        };
        config.apply(overrides).map_err(|mut e| {
            e.file = None;
            e
        })?;
        config.validate().map_err(|mut e| {
            e.file = file.map(Path::to_owned);
            e
        })?;
        Ok(config)
    }

    /// Parses TOML text; the error names the key.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError {
            file: None,
            key: String::new(),
            message: e.to_string().trim().to_string(),
        })?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            ConfigError {
                file: None,
                key: if key == "." { String::new() } else { key },
                message: inner.message().trim().to_string(),
            }
        })
    }

    fn apply(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        if !o.listen.is_empty() {
            self.intercept.listen = o.listen.clone();
        }
        if let Some(mode) = o.mode {
            self.intercept.mode = mode;
        }
        if let Some(upstream) = o.upstream {
            self.intercept.upstream = upstream;
        }
        if let Some(delay) = o.greet_delay {
            self.greet.delay = delay;
        }
        if let Some(action) = o.pregreet_action {
            self.pregreet.action = action;
        }
        if let Some(admin) = &o.admin_listen {
            self.admin.listen = if admin.trim().is_empty() {
                None
            } else {
                Some(admin.trim().parse().map_err(|e| ConfigError {
                    file: None,
                    key: "admin.listen".into(),
                    message: format!("bad socket address `{admin}` ({e})"),
                })?)
            };
        }
        if let Some(format) = o.log_format {
            self.log.format = format;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| {
            Err(ConfigError {
                file: None,
                key: key.into(),
                message,
            })
        };
        if !valid_hostname(&self.hostname) {
            return bad(
                "hostname",
                format!(
                    "`{}` is not a host name usable in SMTP replies",
                    self.hostname
                ),
            );
        }
        if self.intercept.listen.is_empty() {
            return bad("intercept.listen", "at least one address is needed".into());
        }
        if self.intercept.mode == Mode::Fixed
            && self.intercept.listen.contains(&self.intercept.upstream)
        {
            return bad(
                "intercept.upstream",
                format!(
                    "{} is one of our own listen addresses: the guard would proxy to itself",
                    self.intercept.upstream
                ),
            );
        }
        if self.intercept.transparent_upstream && self.intercept.mode != Mode::Tproxy {
            return bad(
                "intercept.transparent_upstream",
                "only possible with mode = \"tproxy\"".into(),
            );
        }
        if self.intercept.mode == Mode::SkLookup {
            if self.sk_lookup.ports.is_empty() {
                return bad("sk_lookup.ports", "at least one port is needed".into());
            }
            if self.sk_lookup.ports.contains(&0) {
                return bad("sk_lookup.ports", "0 is not a port".into());
            }
            // One comparison each in the program.
            if self.sk_lookup.ports.len() > 64 || self.sk_lookup.interfaces.len() > 64 {
                return bad("sk_lookup", "at most 64 ports and 64 interfaces".into());
            }
            if self.sk_lookup.bypass_passed
                && self.sk_lookup.bypass_entries as usize > self.pass_cache.max_entries
            {
                // A pass the guard's cache no longer holds could not be
                // found again by a block of its prefix.
                return bad(
                    "sk_lookup.bypass_entries",
                    format!(
                        "more than pass_cache.max_entries ({})",
                        self.pass_cache.max_entries
                    ),
                );
            }
            if self.sk_lookup.bypass_entries == 0 || self.sk_lookup.bypass_entries > 16 << 20 {
                return bad("sk_lookup.bypass_entries", "between 1 and 16777216".into());
            }
            if self.sk_lookup.interfaces.iter().any(String::is_empty) {
                return bad("sk_lookup.interfaces", "an empty interface name".into());
            }
        } else if self.sk_lookup != SkLookup::default() {
            return bad(
                "sk_lookup",
                format!(
                    "only used with intercept.mode = \"sk_lookup\" (it is \"{}\")",
                    self.intercept.mode.as_str()
                ),
            );
        }
        if self.intercept.upstream_connect_timeout.0.is_zero() {
            return bad(
                "intercept.upstream_connect_timeout",
                "must be more than 0s".into(),
            );
        }
        if self.intercept.workers > MAX_WORKERS {
            return bad(
                "intercept.workers",
                format!("at most {MAX_WORKERS} (0: one per CPU)"),
            );
        }
        if self.greet.banner_timeout.0.is_zero() {
            return bad("greet.banner_timeout", "must be more than 0s".into());
        }
        if self.greet.delay.0 > Duration::from_secs(300) {
            return bad(
                "greet.delay",
                "more than 5m: real senders give up before that".into(),
            );
        }
        if self.pregreet.capture > 4096 {
            return bad("pregreet.capture", "at most 4096 bytes".into());
        }
        if self.relay.idle_timeout.0.is_zero() {
            return bad("relay.idle_timeout", "must be more than 0s".into());
        }
        if self.relay.command_timeout.0.is_zero() {
            return bad("relay.command_timeout", "must be more than 0s".into());
        }
        if self.turns.watch == Watch::Greeting
            && !self.pregreet.action.ends_session()
            && self.pregreet.action != Action::Observe
        {
            return bad(
                "pregreet.action",
                format!(
                    "`{}` needs the session watched after the greeting (turns.watch = \"session\")",
                    self.pregreet.action.as_str()
                ),
            );
        }
        if self.turns.max_command_line < 512 {
            return bad(
                "turns.max_command_line",
                "at least 512 (RFC 5321 §4.5.3.1.4)".into(),
            );
        }
        let header_ok = !self.actions.tag_header.is_empty()
            && self
                .actions
                .tag_header
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b':');
        if !header_ok {
            return bad(
                "actions.tag_header",
                format!("`{}` is not a header field name", self.actions.tag_header),
            );
        }
        for (key, delay) in self.turns.reply_delay.each() {
            if delay.0 > MAX_REPLY_DELAY {
                return bad(
                    &format!("turns.reply_delay.{key}"),
                    format!(
                        "{delay} is more than {}: every such reply would be held that long, \
                         close to the sender's timeout (RFC 5321 §4.5.3.2: 2m for DATA)",
                        Dur(MAX_REPLY_DELAY)
                    ),
                );
            }
        }
        if self.actions.tarpit_delay.0 > Duration::from_secs(120) {
            return bad(
                "actions.tarpit_delay",
                "more than 2m: senders time out and retry".into(),
            );
        }
        if self.limits.blocklist_max == 0 {
            return bad("limits.blocklist_max", "must be at least 1".into());
        }
        if !self.quarantine.dir.is_absolute() {
            // The daemon's working directory is not the operator's: a
            // relative path would put mail somewhere nobody looks.
            return bad(
                "quarantine.dir",
                format!(
                    "`{}` must be an absolute path",
                    self.quarantine.dir.display()
                ),
            );
        }
        if self.quarantine.max_message_size == 0 {
            return bad("quarantine.max_message_size", "must be at least 1".into());
        }
        for (key, path) in [
            ("admin.token_file", &self.admin.token_file),
            ("log.events", &self.log.events),
        ] {
            if let Some(path) = path.as_ref().filter(|p| !p.is_absolute()) {
                return bad(
                    key,
                    format!("`{}` must be an absolute path", path.display()),
                );
            }
        }
        if let Err((key, message)) = crate::admission_config::validate(
            &self.admission,
            &self.reputation,
            &self.alert,
            &self.senders,
            &self.state,
            &self.cluster,
            &self.nftables,
        ) {
            return bad(&key, message);
        }
        if self.nftables.enabled && self.nftables.redirect {
            if self.intercept.mode != Mode::Redirect {
                return bad(
                    "nftables.redirect",
                    format!(
                        "needs intercept.mode = \"redirect\" (it is \"{}\")",
                        self.intercept.mode.as_str()
                    ),
                );
            }
            // One port for both families: the rule is `redirect to :PORT`.
            let port = self.intercept.listen[0].port();
            if self.intercept.listen.iter().any(|a| a.port() != port) || port == 0 {
                return bad(
                    "nftables.redirect",
                    "needs every intercept.listen address on one port (not 0)".into(),
                );
            }
            if self.nftables.ports.contains(&port) {
                return bad(
                    "nftables.redirect",
                    format!("the listen port {port} is one of nftables.ports: the guard would take its own upstream connections for loops"),
                );
            }
        }
        // A bare word must be a level: `inof` would parse as a target name
        // and silently turn every log line off.
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        let bare_ok = self.log.level.split(',').all(|d| {
            let d = d.trim();
            d.contains('=') || LEVELS.contains(&d.to_ascii_lowercase().as_str())
        });
        if !bare_ok {
            return bad(
                "log.level",
                format!(
                    "`{}`: a level is one of trace, debug, info, warn, error, off (or target=level)",
                    self.log.level
                ),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return bad(
                "log.level",
                format!("bad filter `{}` ({e})", self.log.level),
            );
        }
        Ok(())
    }

    /// Some test's action keeps mail in quarantine.
    pub fn uses_quarantine(&self) -> bool {
        let a = &self.actions;
        [
            self.pregreet.action,
            a.pipelining,
            a.early_data,
            a.non_smtp,
            a.tls_on_plaintext,
            a.bare_lf,
            a.long_line,
            a.unknown_commands,
            a.smuggling,
            a.starttls_injection,
        ]
        .contains(&Action::Quarantine)
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.greet.delay, Dur::secs(6));
        assert!(c.greet.challenge);
        assert_eq!(c.pregreet.action, PregreetAction::Reject);
        assert_eq!(c.pregreet.block_ttl, Dur::secs(3600));
    }

    #[test]
    fn durations_read_like_people_write_them() {
        let c = Config::parse("[greet]\ndelay = \"500ms\"\nconnect_lead = \"0s\"\n").unwrap();
        assert_eq!(c.greet.delay.0, Duration::from_millis(500));
        assert_eq!(c.greet.connect_lead.0, Duration::ZERO);
    }

    #[test]
    fn an_unknown_key_is_named() {
        let e = Config::parse("[greet]\ndelya = \"6s\"\n").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("delya"), "{text}");
        assert!(text.contains("greet"), "{text}");
    }

    #[test]
    fn a_bad_duration_names_its_key() {
        let e = Config::parse("[greet]\ndelay = \"six\"\n").unwrap_err();
        assert_eq!(e.key, "greet.delay");
        assert!(e.message.contains("six"), "{}", e.message);
    }

    #[test]
    fn a_bad_action_names_its_key() {
        let e = Config::parse("[pregreet]\naction = \"nuke\"\n").unwrap_err();
        assert_eq!(e.key, "pregreet.action");
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("mxguard-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[relay]\nmode = \"teleport\"\n").unwrap();
        let e = Config::load(Some(&path), &Overrides::default()).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with(&path.display().to_string()), "{text}");
        assert!(text.contains("relay.mode"), "{text}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let o = Overrides {
            greet_delay: Some(Dur::secs(1)),
            pregreet_action: Some(PregreetAction::Observe),
            listen: vec!["127.0.0.1:2525".parse().unwrap()],
            admin_listen: Some(String::new()),
            ..Overrides::default()
        };
        let mut c = Config::parse("[greet]\ndelay = \"9s\"\n").unwrap();
        c.apply(&o).unwrap();
        c.validate().unwrap();
        assert_eq!(c.greet.delay, Dur::secs(1));
        assert_eq!(c.pregreet.action, PregreetAction::Observe);
        assert_eq!(c.admin.listen, None);
    }

    #[test]
    fn proxying_to_ourselves_is_refused() {
        let c = Config::parse(
            "[intercept]\nlisten = [\"127.0.0.1:2525\"]\nupstream = \"127.0.0.1:2525\"\n",
        )
        .unwrap();
        assert_eq!(c.validate().unwrap_err().key, "intercept.upstream");
    }

    #[test]
    fn hostname_cannot_break_a_reply_line() {
        let c = Config::parse("hostname = \"a b\\r\\n250 ok\"\n").unwrap();
        assert_eq!(c.validate().unwrap_err().key, "hostname");
    }

    #[test]
    fn the_quarantine_section_reads_and_checks() {
        let c = Config::parse("").unwrap();
        assert_eq!(
            c.quarantine.dir,
            PathBuf::from("/var/lib/mxguard/quarantine")
        );
        assert_eq!(c.quarantine.max_message_size, 50 * 1024 * 1024);
        let c = Config::parse("[quarantine]\ndir = \"/srv/q\"\nmax_message_size = 1000\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.quarantine.dir, PathBuf::from("/srv/q"));
        assert_eq!(c.quarantine.max_message_size, 1000);
        let c = Config::parse("[quarantine]\ndir = \"q\"\n").unwrap();
        assert_eq!(c.validate().unwrap_err().key, "quarantine.dir");
        let c = Config::parse("[quarantine]\nmax_message_size = 0\n").unwrap();
        assert_eq!(c.validate().unwrap_err().key, "quarantine.max_message_size");
        let e = Config::parse("[quarantine]\ndirectory = \"/srv/q\"\n").unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        let e = Config::parse("[quarantine]\nmax_message_size = \"50M\"\n").unwrap_err();
        assert_eq!(e.key, "quarantine.max_message_size");
    }

    #[test]
    fn a_reply_delay_past_the_bound_is_refused_by_name() {
        let c = Config::parse("[turns.reply_delay]\nrcpt = \"10m\"\n").unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "turns.reply_delay.rcpt");
        assert!(e.message.contains("10m"), "{}", e.message);
        assert!(e.message.contains("more than 1m"), "{}", e.message);
        for key in ["ehlo", "helo", "mail", "data", "end_of_data", "other"] {
            let c = Config::parse(&format!("[turns.reply_delay]\n{key} = \"61s\"\n")).unwrap();
            assert_eq!(
                c.validate().unwrap_err().key,
                format!("turns.reply_delay.{key}")
            );
        }
        let c = Config::parse("[turns.reply_delay]\nrcpt = \"1m\"\nehlo = \"2s\"\n").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn load_names_the_file_and_the_reply_delay() {
        let dir = std::env::temp_dir().join(format!("mxguard-config-rd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("slow.toml");
        std::fs::write(&path, "[turns.reply_delay]\nend_of_data = \"10m\"\n").unwrap();
        let e = Config::load(Some(&path), &Overrides::default()).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with(&path.display().to_string()), "{text}");
        assert!(
            text.contains("key `turns.reply_delay.end_of_data`"),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sk_lookup_settings_need_their_mode_and_sane_values() {
        let mode = "[intercept]\nmode = \"sk_lookup\"\nlisten = [\"127.0.0.1:10025\"]\n";
        let c = Config::parse(&format!(
            "{mode}[sk_lookup]\nports = [25, 587]\ninterfaces = [\"eth0\"]\nbypass_passed = true\n"
        ))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.intercept.mode, Mode::SkLookup);
        assert_eq!(c.intercept.mode.as_str(), "sk_lookup");
        assert_eq!(c.sk_lookup.ports, [25, 587]);
        assert!(c.sk_lookup.bypass_passed);
        assert_eq!(c.sk_lookup.bypass_entries, 65_536);
        // The defaults alone: port 25 from every interface, no bypass.
        let c = Config::parse(mode).unwrap();
        c.validate().unwrap();
        assert_eq!(c.sk_lookup, SkLookup::default());
        for (bad, key) in [
            ("ports = []\n", "sk_lookup.ports"),
            ("ports = [0]\n", "sk_lookup.ports"),
            ("interfaces = [\"\"]\n", "sk_lookup.interfaces"),
            ("bypass_entries = 0\n", "sk_lookup.bypass_entries"),
            (
                "bypass_passed = true\nbypass_entries = 2000\n[pass_cache]\nmax_entries = 1000\n",
                "sk_lookup.bypass_entries",
            ),
        ] {
            let c = Config::parse(&format!("{mode}[sk_lookup]\n{bad}")).unwrap();
            assert_eq!(c.validate().unwrap_err().key, key, "{bad}");
        }
        let many: Vec<String> = (1..=65).map(|p| p.to_string()).collect();
        let c = Config::parse(&format!(
            "{mode}[sk_lookup]\nports = [{}]\n",
            many.join(", ")
        ))
        .unwrap();
        assert_eq!(c.validate().unwrap_err().key, "sk_lookup");
        // Settings for another mode's guard are a mistake, not a no-op.
        let c = Config::parse("[sk_lookup]\nbypass_passed = true\n").unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "sk_lookup");
        assert!(e.message.contains("\"fixed\""), "{}", e.message);
        // The nftables redirect is the other mode's.
        let c = Config::parse(&format!(
            "{mode}[nftables]\nenabled = true\nredirect = true\nredirect_interfaces = [\"eth0\"]\n"
        ))
        .unwrap();
        assert_eq!(c.validate().unwrap_err().key, "nftables.redirect");
    }

    #[test]
    fn the_kernel_bypass_needs_the_redirect_and_the_redirect_its_own_port() {
        let base =
            "[intercept]\nmode = \"redirect\"\nlisten = [\"0.0.0.0:10025\", \"[::]:10025\"]\n\
                    [nftables]\nenabled = true\n";
        let c = Config::parse(&format!(
            "{base}redirect = true\nredirect_interfaces = [\"eth0\"]\nbypass_passed = true\n"
        ))
        .unwrap();
        c.validate().unwrap();
        assert!(c.nftables.bypass_passed && c.nftables.redirect);
        for (extra, key) in [
            ("bypass_passed = true\n", "nftables.bypass_passed"),
            ("redirect = true\n", "nftables.redirect_interfaces"),
            (
                "redirect = true\nredirect_interfaces = [\"eth0 }\"]\n",
                "nftables.redirect_interfaces",
            ),
            (
                "redirect = true\ncreate = false\nredirect_interfaces = [\"eth0\"]\n",
                "nftables.redirect",
            ),
            (
                "redirect = true\nredirect_interfaces = [\"eth0\"]\nports = [10025]\n",
                "nftables.redirect",
            ),
        ] {
            let c = Config::parse(&format!("{base}{extra}")).unwrap();
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, key, "{extra}: {e}");
        }
        let fixed = "[intercept]\nmode = \"fixed\"\nlisten = [\"0.0.0.0:10025\"]\n\
                     [nftables]\nenabled = true\nredirect = true\nredirect_interfaces = [\"eth0\"]\n";
        assert_eq!(
            Config::parse(fixed).unwrap().validate().unwrap_err().key,
            "nftables.redirect"
        );
        let two_ports = "[intercept]\nmode = \"redirect\"\nlisten = [\"0.0.0.0:10025\", \"[::]:10026\"]\n\
                         [nftables]\nenabled = true\nredirect = true\nredirect_interfaces = [\"eth*\"]\n";
        assert_eq!(
            Config::parse(two_ports)
                .unwrap()
                .validate()
                .unwrap_err()
                .key,
            "nftables.redirect"
        );
    }

    #[test]
    fn the_printed_config_reads_back_the_same() {
        let c = Config::parse("[greet]\ndelay = \"1500ms\"\n[admin]\nlisten = \"\"\n").unwrap();
        let again = Config::parse(&c.to_toml()).unwrap();
        assert_eq!(c, again);
    }
}
