//! The typed, validated blueprint that the rest of OneCommons works with.

use std::path::PathBuf;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::template::{Ref, Template};

/// A loaded blueprint with every included blueprint flattened into it.
///
/// Components of an included blueprint are named `INCLUDE.COMPONENT`
/// (for example `other.web`); every reference is already rewritten to the
/// flat names, so a consumer never needs to know about inclusion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Blueprint {
    pub name: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub depends_on_projects: Vec<ProjectDependency>,
    #[serde(default)]
    pub inputs: IndexMap<String, InputSpec>,
    #[serde(default)]
    pub secrets: IndexMap<String, SecretSpec>,
    #[serde(default)]
    pub outputs: IndexMap<String, Template>,
    pub components: IndexMap<String, Component>,
    /// What the site's workloads may reach besides their own components.
    #[serde(default, skip_serializing_if = "Network::is_default")]
    pub network: Network,
    /// DataCommons collections the app reads and writes, by NSID.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub data: IndexMap<String, DataCollection>,
    /// Every file read to build this blueprint, the root file first.
    #[serde(default)]
    pub files: Vec<PathBuf>,
}

/// `data.NSID`: one DataCommons collection an app declares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataCollection {
    pub class: DataClass,
    /// SPDX id; public collections only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub licence: Option<String>,
    /// The Lexicon document, as read from `schema_file`.
    pub schema: serde_json::Value,
    pub schema_file: PathBuf,
    /// Why the app needs it: shown on the consent screen.
    pub purpose: String,
    pub access: DataAccess,
    /// Private collections: the fields this app reads (default: all the
    /// schema declares).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
    /// Fields to index for equality queries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub index: Vec<String>,
}

/// A collection's sharing class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataClass {
    /// Plaintext, signed, readable by anyone, under a licence.
    Public,
    /// Encrypted; the owner chooses which people and apps may read.
    Personal,
    /// Encrypted; an app sees only the fields it declares.
    Private,
}

/// What an app does with a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataAccess {
    pub read: bool,
    pub write: bool,
}

/// `network:` — what a sandboxed site's workloads may reach. The gateway
/// always reaches them; they never reach other sites or the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// The internet (and DNS): `true` unless the blueprint says
    /// `network: { egress: false }`.
    pub egress: bool,
}

impl Default for Network {
    fn default() -> Network {
        Network { egress: true }
    }
}

impl Network {
    pub fn is_default(&self) -> bool {
        *self == Network::default()
    }
}

/// An upstream developer project whose code this blueprint uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectDependency {
    pub project: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputType {
    String,
    Int,
    Bool,
    List,
    Map,
}

impl InputType {
    pub const NAMES: [&'static str; 5] = ["string", "int", "bool", "list", "map"];

    pub fn name(self) -> &'static str {
        match self {
            InputType::String => "string",
            InputType::Int => "int",
            InputType::Bool => "bool",
            InputType::List => "list",
            InputType::Map => "map",
        }
    }

    /// Whether `value` has this type.
    pub fn accepts(self, value: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        matches!(
            (self, value),
            (InputType::String, V::String(_))
                | (InputType::Bool, V::Bool(_))
                | (InputType::List, V::Array(_))
                | (InputType::Map, V::Object(_))
        ) || (self == InputType::Int && value.as_i64().is_some())
    }

    /// Parses a value given on the command line (`--input key=value`).
    pub fn parse_cli(self, raw: &str) -> Result<serde_json::Value, String> {
        use serde_json::Value as V;
        match self {
            InputType::String => Ok(V::String(raw.to_string())),
            InputType::Int => raw
                .trim()
                .parse::<i64>()
                .map(V::from)
                .map_err(|_| format!("expected an integer, got \"{raw}\"")),
            InputType::Bool => match raw.trim() {
                "true" => Ok(V::Bool(true)),
                "false" => Ok(V::Bool(false)),
                _ => Err(format!("expected true or false, got \"{raw}\"")),
            },
            InputType::List | InputType::Map => {
                let v: V = serde_json::from_str(raw)
                    .map_err(|e| format!("expected a JSON {} ({e})", self.name()))?;
                if self.accepts(&v) {
                    Ok(v)
                } else {
                    Err(format!("expected a JSON {}, got \"{raw}\"", self.name()))
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    #[serde(rename = "type")]
    pub ty: InputType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Where a secret's value comes from. The value itself never appears in a blueprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretSpec {
    /// A random string of this many characters, made once and kept.
    Generate(usize),
    /// Read from this environment variable at deploy time.
    FromEnv(String),
}

/// One component, after validation and flattening.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Component {
    pub kind: Kind,
    /// Components that must be ready first: `after:` plus every component referenced.
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub env: IndexMap<String, Template>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Route>,
    #[serde(default)]
    pub resources: Resources,
    /// Per-attempt time limit in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Further attempts after a failed one.
    #[serde(default)]
    pub retries: u32,
    /// How a new version of a process replaces the running one (None: the
    /// platform decides, see [`Replace`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace: Option<Replace>,
    /// How many instances of a process or image run at once (`replicas:`).
    /// Loading expands them: the first keeps the component's name, the
    /// others are components of their own named `NAME.2` … `NAME.N` (see
    /// [`replica_of`]), each after the one before, so a redeploy replaces
    /// them one at a time.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub replicas: u32,
    /// Directory commands run in and relative paths resolve against.
    pub dir: PathBuf,
    /// Where the component is declared.
    pub origin: Origin,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// The most instances one component may run.
pub const MAX_REPLICAS: u32 = 64;

/// The component an instance belongs to and its number: `web.3` → (`web`,
/// 3); any other name → (itself, 1). Component names never have a segment
/// that starts with a digit, so the suffix cannot be mistaken.
pub fn replica_of(name: &str) -> (&str, u32) {
    match name.rsplit_once('.') {
        Some((base, n))
            if !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) =>
        {
            match n.parse::<u32>() {
                Ok(n) if n >= 2 => (base, n),
                _ => (name, 1),
            }
        }
        _ => (name, 1),
    }
}

/// The name of instance `n` (from 1) of component `base`.
pub fn replica_name(base: &str, n: u32) -> String {
    if n <= 1 {
        base.to_string()
    } else {
        format!("{base}.{n}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

/// What a component is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kind {
    /// A command that runs once per change and must exit 0.
    Job { command: Template },
    /// A long-running command given `PORT`.
    Process { command: Template },
    /// A directory of files served by the gateway.
    Static { path: PathBuf },
    /// A PostgreSQL database on the platform's server.
    Postgres,
    /// A SQLite database file in the deployment's data directory.
    Sqlite,
    /// A named persistent directory that survives redeploys.
    Volume,
    /// A long-running container from an OCI image, given `PORT`.
    Image(ImageSpec),
}

/// `image:` — what to run and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// `REGISTRY/REPOSITORY:TAG` or `…@sha256:DIGEST`.
    pub reference: String,
    /// Replaces the image's `Cmd` (its entrypoint stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// The port the app listens on inside its own network.
    pub port: u16,
    /// Path inside → a directory of the site's (`${components.X.path}`).
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub volumes: IndexMap<String, Template>,
}

impl Kind {
    /// The blueprint keyword for this kind.
    pub fn keyword(&self) -> &'static str {
        match self {
            Kind::Job { .. } => "job",
            Kind::Process { .. } => "process",
            Kind::Static { .. } => "static",
            Kind::Postgres => "postgres",
            Kind::Sqlite => "sqlite",
            Kind::Volume => "volume",
            Kind::Image(_) => "image",
        }
    }

    /// Whether a component of kind `keyword` runs until stopped (a
    /// `process` or an `image`): supervised, routed, idled and woken.
    pub fn runs(keyword: &str) -> bool {
        matches!(keyword, "process" | "image")
    }

    /// Attributes other components may read with `${components.NAME.ATTR}`.
    pub fn attributes(keyword: &str) -> &'static [&'static str] {
        match keyword {
            "process" | "image" => &["port", "url", "host"],
            "static" => &["path"],
            "postgres" => &["url"],
            "sqlite" => &["path", "url"],
            "volume" => &["path"],
            _ => &[],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Path of an HTTP GET that must answer 2xx or 3xx.
    pub http: String,
    pub timeout_ms: u64,
    pub interval_ms: u64,
}

/// How a redeploy replaces a running process.
///
/// `start-first`: the new version starts beside the old one, the gateway
/// switches to it once it is healthy, and the old one is drained and
/// stopped: no request fails. `stop-first`: the old one stops before the new
/// one starts, for apps that cannot run twice at once (one writable volume).
/// Unset, a process with a health check whose address no other component
/// uses and that has no volume or SQLite file replaces start-first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Replace {
    StartFirst,
    StopFirst,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Where it is served; none: at the deployment's own names
    /// (`DEPLOYMENT.localhost`, `COMPONENT.DEPLOYMENT.localhost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub path: String,
    /// Path prefixes only signed-in users may reach (the gateway answers
    /// 401 to others).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub login: Vec<String>,
    /// Largest request body the gateway passes on (413 beyond).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// Largest request head (request line and headers) the gateway passes
    /// on (431 beyond); at most the gateway's own limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_header_bytes: Option<u64>,
    /// How long the app may take to start its answer (504 beyond); the
    /// gateway's default otherwise (60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout_ms: Option<u64>,
    /// A header in which the gateway hands the app the signed-in user's id
    /// (lower case; removed from what clients send), for apps that take a
    /// trusted user header instead of verifying the signed assertion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_header: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU limit in thousandths of a core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

impl Component {
    /// Every template the component reads (command or volumes first, then
    /// env in order).
    pub fn templates(&self) -> impl Iterator<Item = &Template> {
        let own: Vec<&Template> = match &self.kind {
            Kind::Job { command } | Kind::Process { command } => vec![command],
            Kind::Image(image) => image.volumes.values().collect(),
            _ => Vec::new(),
        };
        own.into_iter().chain(self.env.values())
    }

    /// Every reference the component reads.
    pub fn refs(&self) -> impl Iterator<Item = &Ref> {
        self.templates().flat_map(|t| t.refs())
    }
}
