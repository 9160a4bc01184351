//! A real open-source application from PyPI — datasette serving a SQLite
//! database — installed by its blueprint into the site's own directory,
//! deployed sandboxed (when the tests run as root) and queried.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn datasette_serves_a_query_as_json() {
    let s = Sandbox::new("datasette");
    s.blueprint(
        r#"name: data
project: onecommons.org/examples/datasette
depends_on_projects:
  - { project: datasette.io, weight: 3 }
  - { project: sqlite.org }
components:
  db: { sqlite: {} }
  install:
    job: >-
      test -x $COMMONS_DATA_DIR/venv/bin/datasette ||
      { python3 -m venv $COMMONS_DATA_DIR/venv && $COMMONS_DATA_DIR/venv/bin/pip install -q "datasette==0.65.*"; }
    timeout: 5m
  seed:
    job: >-
      python3 -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]);
      c.execute('CREATE TABLE IF NOT EXISTS birds (name text, wingspan_cm int)');
      c.execute('DELETE FROM birds');
      c.executemany('INSERT INTO birds VALUES (?, ?)', [('swift', 42), ('albatross', 340), ('wren', 15)]);
      c.commit()" ${components.db.path}
  web:
    process: $COMMONS_DATA_DIR/venv/bin/datasette serve ${components.db.path} --host 127.0.0.1 --port $PORT --setting sql_time_limit_ms 2000
    after: [install, seed]
    health: { http: "/-/versions.json", timeout: 60s }
    resources: { memory: 256Mi, pids: 64 }
"#,
    );
    let sandbox = if is_root() { "1" } else { "0" };
    let r = Run(s
        .cmd(&["deploy"])
        .env("COMMONS_SANDBOX", sandbox)
        .output()
        .unwrap());
    assert_eq!(r.code(), 0, "{}", r.all());
    let web = s.component("data", "web");
    let q = "/db.json?sql=select+name+from+birds+where+wingspan_cm+%3E+40+order+by+wingspan_cm+desc&_shape=array";
    let mut answer = (0, String::new());
    assert!(wait_for(Duration::from_secs(10), || {
        answer = component_get(&web, q).unwrap_or_default();
        answer.0 == 200
    }));
    let rows: serde_json::Value =
        serde_json::from_str(&answer.1).unwrap_or_else(|e| panic!("{e}: {}", answer.1));
    assert_eq!(
        rows,
        serde_json::json!([{ "name": "albatross" }, { "name": "swift" }])
    );
    if sandbox == "1" {
        assert!(
            web["uid"].as_u64().unwrap() >= 200_000,
            "datasette runs as its site's user: {web}"
        );
    }
}
