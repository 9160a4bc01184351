//! A real browser for tests: Debian's headless Chromium driven over
//! WebDriver (chromedriver) by fantoccini, with helpers to fill forms,
//! wait for pages, check them for labels and sideways scroll, and keep
//! screenshots under `target/console-screenshots/`.

use std::time::{Duration, Instant};

use fantoccini::ClientBuilder;
pub use fantoccini::{Client, Locator};

use super::{free_port, wait_for};

/// chromedriver on a loopback port, its browsers' profile in `profile`;
/// on drop, both are killed (a failed test leaves no browser behind).
pub struct Driver {
    child: std::process::Child,
    pub port: u16,
    pub profile: std::path::PathBuf,
}

impl Driver {
    pub fn start(profile: std::path::PathBuf) -> Driver {
        let port = free_port();
        let child = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("chromedriver is needed for this test ({e}); `bash scripts/test` installs chromium-driver")
            });
        let up = wait_for(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "chromedriver did not listen on 127.0.0.1:{port}");
        Driver {
            child,
            port,
            profile,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Chromium outlives a killed chromedriver: find it by its profile.
        let _ = std::process::Command::new("pkill")
            .args(["-f", "--"])
            .arg(format!("--user-data-dir={}", self.profile.display()))
            .status();
    }
}

pub async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1000",
                     format!("--user-data-dir={}", driver.profile.display())],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("chromium starts under chromedriver")
}

pub fn artefacts() -> std::path::PathBuf {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(artefacts().join(format!("{name}.png")), png).unwrap();
}

/// Every visible field has a label, and nothing scrolls sideways.
pub async fn accessible(c: &Client, page: &str) {
    let unlabelled = c
        .execute(
            "return [...document.querySelectorAll('input:not([type=hidden]),select,textarea')]
                .filter(e => e.labels.length === 0).map(e => e.name)",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        unlabelled,
        serde_json::json!([]),
        "{page}: fields without a label"
    );
    let fits = c
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(fits, serde_json::json!(true), "{page} scrolls sideways");
}

pub async fn fill(c: &Client, id: &str, text: &str) {
    c.find(Locator::Id(id))
        .await
        .unwrap()
        .send_keys(text)
        .await
        .unwrap();
}

pub async fn click(c: &Client, what: Locator<'_>) {
    c.find(what).await.unwrap().click().await.unwrap();
}

pub async fn text_of(c: &Client, what: Locator<'_>) -> String {
    c.find(what).await.unwrap().text().await.unwrap()
}

/// Waits for the page titled `want`: a click on a form's button returns
/// before the browser has followed its answer.
pub async fn arrive(c: &Client, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = match c.find(Locator::Css("h1")).await {
            Ok(h1) => h1.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected the page \"{want}\", still on \"{now}\""
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Loads `url` again until its page shows `text` (what the page reports
/// may lag what was just done, e.g. metered usage), for at most 10 s.
pub async fn reload_until(c: &Client, url: &str, text: &str) {
    let started = Instant::now();
    loop {
        c.goto(url).await.unwrap();
        if c.source().await.unwrap().contains(text) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{url} never showed \"{text}\""
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
