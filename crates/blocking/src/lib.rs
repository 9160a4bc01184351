//! Blocking calls made safely from any thread.
//!
//! The synchronous `postgres` client drives a runtime of its own and
//! panics ("Cannot start a runtime from within a runtime") when called on a
//! thread that is running an async runtime, such as an HTTP handler's. The
//! stores that hold such a client (the ledger's, billing's, the meter's)
//! run each call through [`outside_async`], so their callers need not know
//! which thread they are on.

#![forbid(unsafe_code)]

/// Runs `f` here, or — when this thread is inside an async runtime — on a
/// short-lived thread of its own, waiting for it. `f` may borrow from the
/// caller. A panic in `f` is the caller's panic.
pub fn outside_async<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_in_place_outside_a_runtime_and_borrows() {
        let here = std::thread::current().id();
        let mut seen = Vec::new();
        outside_async(|| seen.push(std::thread::current().id()));
        assert_eq!(seen, [here]);
    }

    #[test]
    fn inside_a_runtime_it_runs_on_another_thread() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let here = std::thread::current().id();
        let there = rt.block_on(async { outside_async(|| std::thread::current().id()) });
        assert_ne!(there, here);
    }

    /// What it is for: the synchronous PostgreSQL client, called from an
    /// async task, would panic without it.
    #[test]
    fn the_postgres_client_works_from_an_async_task() {
        let url = std::env::var("COMMONS_TEST_POSTGRES")
            .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
        let mut client = postgres::Client::connect(&url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("this test needs PostgreSQL at {url:?}: {e}"));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let n: i32 = rt.block_on(async {
            outside_async(|| client.query_one("SELECT 41 + 1", &[]).unwrap().get(0))
        });
        assert_eq!(n, 42);
    }

    #[test]
    fn a_panic_reaches_the_caller() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async { outside_async(|| panic!("inside")) })
        }));
        assert!(caught.is_err());
    }
}
