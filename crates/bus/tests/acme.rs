//! ACME answers through the JetStream key-value bucket, against a real
//! `nats-server -js`: what one gateway puts, another reads; a removed or
//! unknown token has no answer; platforms do not see each other's.

mod common;

use common::*;
use commons_bus::acme::AcmeAnswers;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_put_by_one_gateway_is_read_by_another() {
    let dir = temp("acme");
    let port = free_port();
    let mut server = nats(port, &dir);
    let url = format!("nats://127.0.0.1:{port}");
    let ordering = AcmeAnswers::connect(&url, "t_acme").await.unwrap();
    let answering = AcmeAnswers::connect(&url, "t_acme").await.unwrap();
    let other_platform = AcmeAnswers::connect(&url, "t_other").await.unwrap();

    let token = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA";
    assert_eq!(answering.get(token).await, None);
    ordering
        .put(token, &format!("{token}.thumbprint"))
        .await
        .unwrap();
    assert_eq!(
        answering.get(token).await.as_deref(),
        Some(format!("{token}.thumbprint").as_str())
    );
    assert_eq!(
        other_platform.get(token).await,
        None,
        "another platform's bucket"
    );
    assert_eq!(answering.get("unknown_token").await, None);
    ordering.remove(token).await;
    assert_eq!(
        answering.get(token).await,
        None,
        "removed once the order ended"
    );
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
