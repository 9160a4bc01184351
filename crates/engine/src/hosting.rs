//! Hosting plans: free sites are idled when unused and woken on demand;
//! always-on ones keep running.

use super::*;

/// How a site is hosted, as its operator chose (`commons deploy --hosting`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hosting {
    /// Free hosting: its processes are stopped after a while without
    /// traffic (`COMMONS_IDLE_AFTER`) and woken by the next request.
    #[default]
    Free,
    /// Kept running whether or not anybody uses it.
    AlwaysOn,
}

impl Hosting {
    pub fn as_str(self) -> &'static str {
        match self {
            Hosting::Free => "free",
            Hosting::AlwaysOn => "always-on",
        }
    }
}

impl Engine {
    /// The hosting plan of `name` (free unless its operator chose otherwise).
    pub fn hosting(&self, name: &str) -> Hosting {
        std::fs::read(self.layout.hosting_file(name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Puts `name` on a hosting plan.
    pub fn set_hosting(&self, name: &str, hosting: Hosting) -> Result<(), EngineError> {
        if self.store.deployment(name)?.is_none() {
            return Err(EngineError::Input(format!(
                "no deployment named \"{name}\""
            )));
        }
        let path = self.layout.hosting_file(name);
        std::fs::write(&path, serde_json::to_vec(&hosting).expect("serialises"))
            .map_err(EngineError::io(format!("writing {}", path.display())))
    }

    /// Stops the running processes of `name` for lack of traffic; they show
    /// as `idle` and are started again by [`Engine::wake`] (or a deploy).
    /// Returns the components stopped.
    pub async fn idle(&self, name: &str) -> Result<Vec<String>, EngineError> {
        let _lock = self.lock(name)?;
        let mut changes = Vec::new();
        let mut stopped = Vec::new();
        for mut row in self.store.components(name)? {
            let mut handle = plan::handle_of(&row);
            if !commons_blueprint::Kind::runs(&row.kind)
                || row.state != ComponentState::Ready
                || handle.idle
            {
                continue;
            }
            commons_runtime::drivers::stop_instance(
                name,
                &row.name,
                &handle,
                commons_runtime::drivers::STOP_GRACE,
            )
            .await;
            handle.idle = true;
            row.handle = serde_json::to_value(&handle).expect("handle serialises");
            stopped.push(row.name.clone());
            changes.push(commons_store::ComponentChange::Put(row));
        }
        self.store.apply(name, &changes, &[])?;
        Ok(stopped)
    }

    /// Starts the idle (or stopped) processes of `name` and returns once they
    /// are healthy: what the gateway calls on the first request to an idle site.
    pub async fn wake(&self, name: &str) -> Result<Outcome, EngineError> {
        let waking: Vec<String> = self
            .observe(name)?
            .components
            .into_iter()
            .filter(|c| {
                commons_blueprint::Kind::runs(&c.kind) && (c.state == "idle" || is_down(&c.state))
            })
            .map(|c| c.name)
            .collect();
        self.restart_stopped(name, &waking).await
    }
}
