//! One driver per component kind.

mod job;
pub mod postgres;
mod process;
pub use process::{gateway_still_uses, GatewayLoad, OtherGateways, GATEWAY_LOAD_KIND};
mod resources;

use crate::{Applied, BoxFuture, DriverError, Handle, Layout, Observed, Spec};

pub use job::JobDriver;
pub use postgres::PostgresDriver;
pub use process::{retire, stop_instance, ProcessDriver, DRAIN_LIMIT, STOP_GRACE};
pub use resources::{SqliteDriver, StaticDriver, VolumeDriver};

/// Makes one kind of component real, and undoes it.
///
/// `apply` creates the component, or updates it in place when `previous` is
/// the handle of the version it replaces; `remove` undoes it; `observe` looks
/// without changing anything. Drivers are stateless: everything they need to
/// find a component again is in its [`Handle`].
pub trait Driver: Send + Sync {
    /// Outputs known before the component exists (for `plan`).
    fn planned_outputs(
        &self,
        layout: &Layout,
        spec: &Spec,
        previous: Option<&Handle>,
    ) -> Vec<(String, Option<String>)>;

    fn apply<'a>(
        &'a self,
        layout: &'a Layout,
        spec: &'a Spec,
        previous: Option<&'a Handle>,
    ) -> BoxFuture<'a, Result<Applied, DriverError>>;

    fn remove<'a>(
        &'a self,
        layout: &'a Layout,
        deployment: &'a str,
        component: &'a str,
        handle: &'a Handle,
    ) -> BoxFuture<'a, Result<(), DriverError>>;

    fn observe(&self, handle: &Handle) -> Observed;
}

/// The driver for a blueprint kind keyword.
pub fn driver_for(kind: &str) -> &'static dyn Driver {
    match kind {
        "job" => &JobDriver,
        "process" | "image" => &ProcessDriver,
        "static" => &StaticDriver,
        "volume" => &VolumeDriver,
        "sqlite" => &SqliteDriver,
        _ => &PostgresDriver,
    }
}

/// Kills whatever an interrupted task of this component left running.
///
/// The child wrote its pid before running anything, so even a deploy killed
/// between starting a process and recording it leaves it findable.
pub async fn reap_interrupted(layout: &Layout, deployment: &str, component: &str, instance: &str) {
    let pidfile = layout.pid_file(deployment, component);
    if let Some(pid) = crate::proc::read_pidfile(&pidfile) {
        crate::proc::kill_group(pid, instance).await;
    }
    // An image's container outlives its killed runtime: its id is known
    // from the instance, and runc keeps its state while it exists.
    if crate::image::exists(deployment, component, instance) {
        let netns = crate::image::netns_of(deployment, component, instance);
        crate::image::reap(deployment, component, instance, netns.as_deref()).await;
    }
}
