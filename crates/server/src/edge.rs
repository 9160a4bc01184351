//! A gateway on its own (`commons gateway`): any number of them beside the
//! platform's `commons serve` instances, on hosts of their own, behind one
//! address. Stateless: it keeps nothing it could lose. It reads what it
//! serves from the platform's database and bus — routes from the bus's
//! bucket (from the state, on the sites' own host, without a bus),
//! certificates, keys, tokens, accounts and sign-in codes from the shared
//! store — publishes its usage (to the bus's stream, or the meter's tables
//! without one), and asks a control plane's API to wake an idle site. It
//! runs no workload, serves no API and closes no period.

use std::sync::Arc;

use crate::config::Settings;
use crate::gateway::{ControlPlane, Role};
use crate::run::RunError;
use crate::AppState;

/// Runs the gateway until SIGTERM or SIGINT, then lets requests in flight
/// finish and hands their usage over before it returns.
pub fn run(settings: Settings, control_plane: ControlPlane) -> Result<(), RunError> {
    if matches!(settings.store, commons_store::StoreConfig::Embedded) {
        return Err(RunError::Input(
            "a gateway outside `commons serve` reads the platform's state from its database: \
             set [store] database_url (or COMMONS_DATABASE_URL) to the platform's"
                .into(),
        ));
    }
    if control_plane.token.is_empty() {
        return Err(RunError::Input(
            "COMMONS_CONTROL_PLANE_TOKEN is empty: give a platform token with the scope \
             runtime:wake (`commons token create gateway --scope runtime:wake`)"
                .into(),
        ));
    }
    let home = settings.home.clone();
    let state = AppState::open(&home, &settings.store, None, None)
        .map_err(|e| RunError::Failed(e.to_string()))?;
    // Sign-ins go to the platform's console.
    let _ = state.public_url.set(
        settings
            .public_url
            .clone()
            .unwrap_or_else(|| control_plane.url.trim_end_matches('/').to_string()),
    );
    let state = Arc::new(state);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("the async runtime starts");
    rt.block_on(async {
        let usage_bus = settings
            .bus
            .as_ref()
            .map(|b| commons_bus::usage::UsageConfig::new(&b.url, &b.name));
        let gateway = crate::gateway::spawn(
            &home,
            state,
            settings.gateway,
            usage_bus,
            settings.bus.clone(),
            Role::Edge(control_plane.clone()),
        )
        .map_err(RunError::Input)?;
        for (what, addr) in &gateway.bound {
            eprintln!("{:>12} {what} {addr} (gateway)", "Listening");
        }
        eprintln!("{:>12} idle sites through {}", "Waking", control_plane.url);
        stopped()
            .await
            .map_err(|e| RunError::Failed(e.to_string()))?;
        // Requests in flight finish; their usage is handed over.
        gateway.stop();
        Ok(())
    })
}

/// Returns on SIGTERM or SIGINT.
async fn stopped() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
