//! OCI images: pulled from any OCI distribution registry (the `oci-client`
//! crate: anonymous, basic or token auth), every blob checked against its
//! digest, each layer stored once on the machine however many sites use it,
//! and unpacked for overlay mounts.
//!
//! ```text
//! ROOT/blobs/sha256/HEX          compressed layers, as pulled (verified)
//! ROOT/layers/sha256/HEX/        a layer unpacked, named by its blob's digest
//! ROOT/images/sha256/HEX.json    a pulled manifest: its config and layers
//! ```
//!
//! Whiteouts become overlayfs's own on unpacking: `.wh.NAME` a character
//! device 0/0 named NAME, `.wh..wh..opq` the `trusted.overlay.opaque`
//! attribute on its directory. So a root filesystem is one read-only
//! overlay mount of the image's layer directories, top first ([`Pulled::lower_dirs`]),
//! and two sites from one image share every byte of it. [`run`] makes the
//! bundle an OCI runtime (runc) runs an instance from.

use std::io::Read;
use std::path::{Path, PathBuf};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod run;
pub mod testing;
mod unpack;

pub use run::{Bundle, Container};
pub use unpack::unpack_layer;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference does not parse.
    #[error("{0:?} is not an image reference: write REGISTRY/REPOSITORY:TAG or REPOSITORY@sha256:DIGEST ({1})")]
    Reference(String, String),
    /// The registry refused, or what it sent is not what was asked for.
    #[error("pulling {reference}: {message}")]
    Registry { reference: String, message: String },
    /// A layer in a format this store does not unpack.
    #[error("layer {digest} is {media_type}: only tar and tar+gzip layers are supported")]
    MediaType { digest: String, media_type: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistrySettings {
    /// Registries (`HOST:PORT`) spoken to over plain HTTP: a registry on
    /// the platform's own loopback or private network. All others: HTTPS.
    pub insecure: Vec<String>,
    /// Registries pulled through a mirror: (registry, the mirror's
    /// `HOST:PORT`), e.g. ("docker.io", "mirror.internal:5000"). What is
    /// pulled is checked against its digest as from any registry, and a
    /// deployment still names the image by its own registry.
    pub mirrors: Vec<(String, String)>,
}

/// Credentials for one pull.
#[derive(Clone, Default)]
pub enum Credentials {
    #[default]
    Anonymous,
    Basic {
        user: String,
        password: String,
    },
}

// A password never reaches a log.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { user, .. } => write!(f, "Basic({user}, <redacted>)"),
        }
    }
}

/// What an image says about how to run it (its config's `config`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// An image on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pulled {
    /// The manifest's digest (`sha256:…`): what a deployment record pins.
    pub digest: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    /// Compressed bytes of all layers.
    pub size: u64,
    pub config: RunConfig,
}

/// Progress of a pull: layers done, compressed bytes fetched so far (of
/// those not already here), and the bytes to fetch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub fetched: u64,
    pub to_fetch: u64,
    pub layers_done: usize,
    pub layers: usize,
}

/// `reference` pinned to `digest`: `REGISTRY/REPOSITORY@sha256:…` (a tag,
/// if any, dropped: the digest says which bytes).
pub fn by_digest(reference: &str, digest: &str) -> Result<String, ImageError> {
    let parsed: Reference = reference.parse().map_err(|e: oci_client::ParseError| {
        ImageError::Reference(reference.into(), e.to_string())
    })?;
    Ok(format!(
        "{}/{}@{digest}",
        parsed.registry(),
        parsed.repository()
    ))
}

/// The machine's image store.
pub struct ImageStore {
    root: PathBuf,
    client: Client,
    mirrors: Vec<(String, String)>,
}

fn hex_of(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `sha256:` and the hex digest of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let sum = Sha256::digest(bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in sum {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl ImageStore {
    pub fn new(root: &Path, settings: &RegistrySettings) -> ImageStore {
        // The platform's TLS is rustls over ring, for registries too.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let protocol = if settings.insecure.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(settings.insecure.clone())
        };
        ImageStore {
            mirrors: settings.mirrors.clone(),
            root: root.to_path_buf(),
            client: Client::new(ClientConfig {
                protocol,
                ..Default::default()
            }),
        }
    }

    fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex)
    }

    /// Where the layer of blob `digest` is unpacked.
    pub fn layer_dir(&self, digest: &str) -> PathBuf {
        self.root
            .join("layers/sha256")
            .join(hex_of(digest).unwrap_or("invalid"))
    }

    fn record_path(&self, hex: &str) -> PathBuf {
        self.root.join("images/sha256").join(format!("{hex}.json"))
    }

    /// The image pulled earlier with manifest `digest`, if it is here whole.
    pub fn get(&self, digest: &str) -> Option<Pulled> {
        let hex = hex_of(digest)?;
        let pulled: Pulled =
            serde_json::from_slice(&std::fs::read(self.record_path(hex)).ok()?).ok()?;
        pulled
            .layers
            .iter()
            .all(|l| self.layer_dir(l).is_dir())
            .then_some(pulled)
    }

    /// The overlay lower directories of `image`, top layer first.
    pub fn lower_dirs(&self, image: &Pulled) -> Vec<PathBuf> {
        image
            .layers
            .iter()
            .rev()
            .map(|l| self.layer_dir(l))
            .collect()
    }

    /// Pulls `reference` (by tag or `@sha256:` digest). Layers already here
    /// are neither fetched nor unpacked again. An image pinned by digest
    /// and already here is not asked of the registry at all.
    pub async fn pull(
        &self,
        reference: &str,
        credentials: &Credentials,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<Pulled, ImageError> {
        // The store is root's alone: layers keep their images' owners and
        // modes, which must not be reachable by a host path (a sandboxed
        // workload passes through the platform's 0711 directories).
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.root)
                .and_then(|()| {
                    std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(io("making the image store"))?;
        }
        let named: Reference = reference.parse().map_err(|e: oci_client::ParseError| {
            ImageError::Reference(reference.into(), e.to_string())
        })?;
        if let Some(pinned) = named.digest() {
            if let Some(here) = self.get(pinned) {
                return Ok(here);
            }
        }
        let parsed = self.through_mirror(named);
        let registry_error = |e: oci_client::errors::OciDistributionError| ImageError::Registry {
            reference: reference.to_string(),
            message: e.to_string(),
        };
        let auth = match credentials {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { user, password } => {
                RegistryAuth::Basic(user.clone(), password.clone())
            }
        };
        let (manifest, digest, config) = self
            .client
            .pull_manifest_and_config(&parsed, &auth)
            .await
            .map_err(registry_error)?;
        let refused = |message: String| ImageError::Registry {
            reference: reference.to_string(),
            message,
        };
        if let Some(pinned) = parsed.digest() {
            if pinned != digest {
                return Err(refused(format!(
                    "the registry sent manifest {digest}, not {pinned}"
                )));
            }
        }
        let hex = hex_of(&digest)
            .ok_or_else(|| refused(format!("{digest} is not a sha256 digest")))?
            .to_string();
        if sha256_digest(config.as_bytes()) != manifest.config.digest {
            return Err(refused(format!(
                "its config does not match its digest {}",
                manifest.config.digest
            )));
        }
        #[derive(Deserialize)]
        struct ImageConfig {
            #[serde(default)]
            config: RunConfig,
        }
        let run: ImageConfig = serde_json::from_str(&config)
            .map_err(|e| refused(format!("its config is not an OCI image config: {e}")))?;
        let mut state = Progress {
            layers: manifest.layers.len(),
            ..Progress::default()
        };
        for layer in &manifest.layers {
            if !self.layer_dir(&layer.digest).is_dir()
                && hex_of(&layer.digest).is_some_and(|h| !self.blob_path(h).exists())
            {
                state.to_fetch += layer.size.max(0) as u64;
            }
        }
        progress(state);
        for layer in &manifest.layers {
            let layer_hex = hex_of(&layer.digest)
                .ok_or_else(|| refused(format!("layer {} is not a sha256 digest", layer.digest)))?
                .to_string();
            let dir = self.layer_dir(&layer.digest);
            if !dir.is_dir() {
                let blob = self.blob_path(&layer_hex);
                if !blob.exists() {
                    self.fetch(&parsed, layer, &blob)
                        .await
                        .map_err(|e| match e {
                            Fetch::Registry(e) => registry_error(e),
                            Fetch::Io(e) => e,
                        })?;
                    state.fetched += layer.size.max(0) as u64;
                }
                self.unpack(&layer.digest, &layer.media_type, &blob, &dir)?;
            }
            state.layers_done += 1;
            progress(state);
        }
        let pulled = Pulled {
            digest: digest.clone(),
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            size: manifest.layers.iter().map(|l| l.size.max(0) as u64).sum(),
            config: run.config,
        };
        let record = self.record_path(&hex);
        std::fs::create_dir_all(record.parent().expect("under the root"))
            .map_err(io("making the image store"))?;
        write_whole(
            &record,
            &serde_json::to_vec_pretty(&pulled).expect("serialises"),
        )
        .map_err(io("recording the image"))?;
        Ok(pulled)
    }

    /// Fetches one blob to `blob` (oci-client checks it against its
    /// digest as it streams; a mismatch leaves nothing behind).
    /// `image` as fetched: from its registry's mirror, if it has one.
    fn through_mirror(&self, image: Reference) -> Reference {
        let Some((_, mirror)) = self.mirrors.iter().find(|(r, _)| r == image.registry()) else {
            return image;
        };
        match (image.digest(), image.tag()) {
            (Some(digest), _) => Reference::with_digest(
                mirror.clone(),
                image.repository().to_string(),
                digest.to_string(),
            ),
            (None, tag) => Reference::with_tag(
                mirror.clone(),
                image.repository().to_string(),
                tag.unwrap_or("latest").to_string(),
            ),
        }
    }

    async fn fetch(
        &self,
        image: &Reference,
        layer: &oci_client::manifest::OciDescriptor,
        blob: &Path,
    ) -> Result<(), Fetch> {
        let dir = blob.parent().expect("under the root");
        std::fs::create_dir_all(dir).map_err(|e| Fetch::Io(io("making the blob store")(e)))?;
        let partial = dir.join(format!(
            ".partial-{}-{}",
            std::process::id(),
            blob.file_name().unwrap_or_default().to_string_lossy()
        ));
        let file = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| Fetch::Io(io("writing a layer")(e)))?;
        let got = self.client.pull_blob(image, layer, file).await;
        if let Err(e) = got {
            let _ = std::fs::remove_file(&partial);
            return Err(Fetch::Registry(e));
        }
        std::fs::rename(&partial, blob).map_err(|e| Fetch::Io(io("storing a layer")(e)))
    }

    fn unpack(
        &self,
        digest: &str,
        media_type: &str,
        blob: &Path,
        dir: &Path,
    ) -> Result<(), ImageError> {
        let gzip = media_type.ends_with("gzip");
        if !(gzip || media_type.ends_with(".tar") || media_type.ends_with("tar")) {
            return Err(ImageError::MediaType {
                digest: digest.to_string(),
                media_type: media_type.to_string(),
            });
        }
        let file = std::fs::File::open(blob).map_err(io("reading a layer"))?;
        let reader: Box<dyn Read> = if gzip {
            Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
        } else {
            Box::new(std::io::BufReader::new(file))
        };
        // Unpacked beside its place, then renamed: a layer directory is whole or absent.
        let parent = dir.parent().expect("under the root");
        std::fs::create_dir_all(parent).map_err(io("making the layer store"))?;
        let partial = parent.join(format!(
            ".partial-{}-{}",
            std::process::id(),
            dir.file_name().unwrap_or_default().to_string_lossy()
        ));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(io("making a layer directory"))?;
        if let Err(e) = unpack_layer(reader, &partial) {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(io(format!("unpacking layer {digest}"))(e));
        }
        match std::fs::rename(&partial, dir) {
            Ok(()) => Ok(()),
            // Another pull of the same layer finished first: the same bytes.
            Err(_) if dir.is_dir() => {
                let _ = std::fs::remove_dir_all(&partial);
                Ok(())
            }
            Err(e) => Err(io("storing a layer directory")(e)),
        }
    }

    /// Bytes the store takes on disk (blobs and unpacked layers), counting
    /// each file once however many links it has.
    pub fn disk_usage(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        let mut todo = vec![self.root.clone()];
        while let Some(d) = todo.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(m) = e.path().symlink_metadata() else {
                    continue;
                };
                if m.is_dir() {
                    todo.push(e.path());
                } else if seen.insert((m.dev(), m.ino())) {
                    total += m.blocks() * 512;
                }
            }
        }
        total
    }
}

enum Fetch {
    Registry(oci_client::errors::OciDistributionError),
    Io(ImageError),
}

/// Writes `bytes` to `path` whole (a temporary file renamed into place).
fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
