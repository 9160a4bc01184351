//! Keys every instance sharing the platform's database must hold alike,
//! beyond those the operator copies (`secrets/key`, which seals these):
//! the gateway's identity key, which signs the assertions sites read and
//! is published at every host's JWKS path; the OpenID Connect provider's
//! key, which signs ID tokens; and the ledger's custodian key, which signs
//! the journal's checkpoints (published with the open books). Whoever
//! verifies them must not care which instance made them.
//!
//! The first instance to start with a database keeps its key there, sealed
//! with the platform's key; every other instance takes that one in place of
//! its own file's. An instance alone keeps its file as it is.

use std::path::Path;

use commons_engine::Engine;
use commons_store::StoreConfig;

/// The shared entries' kind.
const KIND: &str = "platform-key";

/// Makes the key file at `path` (which exists) hold the key named `name`
/// that the instances sharing `engine`'s database agreed on; true if that
/// replaced what the file held.
pub fn adopt_shared(engine: &Engine, name: &str, path: &Path) -> Result<bool, String> {
    if matches!(engine.store_config(), StoreConfig::Embedded) {
        return Ok(false);
    }
    let local = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let purpose = format!("{KIND}/{name}");
    let kept = engine
        .store()
        .keep_first(KIND, name, &engine.seal(&purpose, &local))
        .map_err(|e| e.to_string())?;
    let key = engine.open_sealed(&purpose, &kept).ok_or_else(|| {
        format!(
            "the {name} key kept in the database does not open with {}",
            engine.layout.secrets_key().display()
        )
    })?;
    if key == local {
        return Ok(false);
    }
    commons_runtime::layout::write_durable(path, &key)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    tracing::info!(
        key = name,
        "took the key the platform's other instances use"
    );
    Ok(true)
}

/// Makes the files `paths` (which exist) hold what the instances sharing
/// `engine`'s database agreed on under `name`, kept as one entry so that
/// files which belong together (a CA's key and certificate) always come
/// from the same instance; true if that replaced what they held.
pub fn adopt_shared_files(engine: &Engine, name: &str, paths: &[&Path]) -> Result<bool, String> {
    if matches!(engine.store_config(), StoreConfig::Embedded) {
        return Ok(false);
    }
    let read = |path: &Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let local: Vec<Vec<u8>> = paths.iter().map(|p| read(p)).collect::<Result<_, _>>()?;
    let bundle = serde_json::to_vec(&local).map_err(|e| e.to_string())?;
    let purpose = format!("{KIND}/{name}");
    let kept = engine
        .store()
        .keep_first(KIND, name, &engine.seal(&purpose, &bundle))
        .map_err(|e| e.to_string())?;
    let opened = engine.open_sealed(&purpose, &kept).ok_or_else(|| {
        format!(
            "the {name} kept in the database does not open with {}",
            engine.layout.secrets_key().display()
        )
    })?;
    let agreed: Vec<Vec<u8>> = serde_json::from_slice(&opened)
        .ok()
        .filter(|files: &Vec<Vec<u8>>| files.len() == paths.len())
        .ok_or_else(|| {
            format!(
                "the {name} kept in the database is not {} files",
                paths.len()
            )
        })?;
    if agreed == local {
        return Ok(false);
    }
    for (path, bytes) in paths.iter().zip(&agreed) {
        commons_runtime::layout::write_durable(path, bytes)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    tracing::info!(name, "took what the platform's other instances use");
    Ok(true)
}

/// Writes the key named `name` that the instances sharing `engine`'s
/// database agreed on to `path`, if they agreed on one yet; true if it did.
/// For a key an instance only reads until it first uses it.
pub fn fetch_shared(engine: &Engine, name: &str, path: &Path) -> Result<bool, String> {
    if matches!(engine.store_config(), StoreConfig::Embedded) {
        return Ok(false);
    }
    let Some(kept) = engine
        .store()
        .shared(KIND, name)
        .map_err(|e| e.to_string())?
    else {
        return Ok(false);
    };
    let key = engine
        .open_sealed(&format!("{KIND}/{name}"), &kept)
        .ok_or_else(|| {
            format!(
                "the {name} key kept in the database does not open with {}",
                engine.layout.secrets_key().display()
            )
        })?;
    if std::fs::read(path).ok().as_deref() != Some(key.as_slice()) {
        if let Some(dir) = path.parent() {
            commons_runtime::layout::private_dir(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        commons_runtime::layout::write_durable(path, &key)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three instances (three data directories, as on three machines) on
    /// the suite's PostgreSQL, sharing the platform key as an operator does.
    #[test]
    fn instances_sharing_a_database_take_the_first_ones_key() {
        let url = std::env::var("COMMONS_TEST_POSTGRES")
            .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
        let schema = format!("shared_keys_{}", std::process::id());
        let config = StoreConfig::Postgres {
            url: url.clone(),
            schema: schema.clone(),
        };
        let dir = std::env::temp_dir().join(format!("commons-keys-{}", std::process::id()));
        let homes: Vec<_> = ["a", "b", "c"].iter().map(|h| dir.join(h)).collect();
        let a = Engine::open(&homes[0], &config).unwrap();
        for home in &homes[1..] {
            std::fs::create_dir_all(home.join("secrets")).unwrap();
            std::fs::copy(homes[0].join("secrets/key"), home.join("secrets/key")).unwrap();
        }
        let (b, c) = (
            Engine::open(&homes[1], &config).unwrap(),
            Engine::open(&homes[2], &config).unwrap(),
        );
        let key = |home: &Path| home.join("gateway/some.key");
        for (home, bytes) in homes.iter().zip([b"key of a", b"key of b"]) {
            std::fs::create_dir_all(home.join("gateway")).unwrap();
            std::fs::write(key(home), bytes).unwrap();
        }
        assert!(
            !fetch_shared(&c, "some", &key(&homes[2])).unwrap(),
            "none kept yet"
        );
        assert!(
            !adopt_shared(&a, "some", &key(&homes[0])).unwrap(),
            "a's is kept"
        );
        assert!(
            adopt_shared(&b, "some", &key(&homes[1])).unwrap(),
            "b takes a's"
        );
        assert_eq!(std::fs::read(key(&homes[1])).unwrap(), b"key of a");
        assert!(fetch_shared(&c, "some", &key(&homes[2])).unwrap());
        assert_eq!(std::fs::read(key(&homes[2])).unwrap(), b"key of a");
        // Sealed at rest.
        let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let body: Vec<u8> = db
            .query_one(
                &format!("SELECT body FROM {schema}.shared WHERE kind = $1 AND name = 'some'"),
                &[&KIND],
            )
            .unwrap()
            .get(0);
        assert!(!body.windows(8).any(|w| w == b"key of a"));
        drop((a, b, c));
        db.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
