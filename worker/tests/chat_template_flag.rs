//! `--chat-template FILE` on `tandem serve` and `tandem frontend`: the file's
//! Jinja replaces the default model's own template (seen through `/tokenize` with
//! `messages` and a chat request's usage), and a file that does not compile stops
//! start-up with an error naming it.
//!
//! The default model must be in the cache (`make model`).

mod process_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use process_support::{free_port, tandem_bin, Proc};
use serde_json::{json, Value};

/// Prefixes a marker no model template writes, then a plain transcript.
const TEMPLATE: &str = "TANDEM-MARKER {% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}";
/// What [`TEMPLATE`] renders for one user turn "Hi", with the generation prompt.
const RENDERED: &str = "TANDEM-MARKER [user] Hi\n[assistant] ";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

async fn post(client: &reqwest::Client, proc: &Proc, path: &str, body: Value) -> (u16, Value) {
    let r = client
        .post(proc.http_url(path))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = r.status().as_u16();
    let bytes = r.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

/// `/tokenize` of one user turn renders through the file: its tokens are those
/// of the expected text as a plain prompt, and they decode back to it.
async fn check_template_applies(client: &reqwest::Client, proc: &Proc) {
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let (status, by_template) =
        post(client, proc, "/tokenize", json!({"messages": messages})).await;
    assert_eq!(status, 200, "{by_template}");
    let (status, by_text) = post(client, proc, "/tokenize", json!({"prompt": RENDERED})).await;
    assert_eq!(status, 200, "{by_text}");
    assert_eq!(by_template["tokens"], by_text["tokens"]);

    let (_, plain) = post(
        client,
        proc,
        "/tokenize",
        json!({"messages": messages, "add_special_tokens": false}),
    )
    .await;
    let (status, text) = post(
        client,
        proc,
        "/detokenize",
        json!({"tokens": plain["tokens"]}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(text["prompt"], RENDERED);
}

#[tokio::test]
async fn serve_renders_chat_with_the_template_file() {
    let dir = tempfile::tempdir().unwrap();
    let template = write(dir.path(), "marker.jinja", TEMPLATE);
    let mut serve = Proc::spawn(
        "serve",
        "serve",
        &["--chat-template", template.to_str().unwrap()],
        false,
    );
    serve.wait_healthy(Duration::from_secs(300)).await;
    let client = reqwest::Client::new();
    check_template_applies(&client, &serve).await;

    // A chat request uses it too: its prompt is as many tokens as /tokenize says.
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let (_, tokenized) = post(&client, &serve, "/tokenize", json!({"messages": messages})).await;
    let (status, chat) = post(
        &client,
        &serve,
        "/v1/chat/completions",
        json!({"model": "default", "messages": messages, "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["usage"]["prompt_tokens"], tokenized["count"]);
}

#[tokio::test]
async fn the_frontend_renders_with_the_template_file() {
    let dir = tempfile::tempdir().unwrap();
    let template = write(dir.path(), "marker.jinja", TEMPLATE);
    // No decode worker answers there: /health stays 503, but the frontend has
    // its tokenizer and template, which is all /tokenize needs.
    let nobody = format!("127.0.0.1:{}", free_port());
    let frontend = Proc::spawn(
        "frontend",
        "frontend",
        &[
            "--chat-template",
            template.to_str().unwrap(),
            "--decode-workers",
            &nobody,
        ],
        false,
    );
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let answer = client
            .post(frontend.http_url("/tokenize"))
            .header("content-type", "application/json")
            .body(json!({"prompt": "x"}).to_string())
            .send()
            .await;
        if answer.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "the frontend never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check_template_applies(&client, &frontend).await;
}

#[test]
fn a_template_that_does_not_compile_stops_start_up_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let broken = write(
        dir.path(),
        "broken.jinja",
        "{% for m in messages %}{{ m['content'] }}",
    );
    let empty = write(dir.path(), "empty.jinja", "  \n");
    let missing = dir.path().join("missing.jinja");
    let port = free_port().to_string();
    let cases = [
        ("serve", &broken, "does not compile"),
        ("frontend", &broken, "does not compile"),
        ("serve", &empty, "empty"),
        ("serve", &missing, "No such file"),
    ];
    for (role, file, why) in cases {
        let started = Instant::now();
        let mut cmd = Command::new(tandem_bin());
        cmd.args([role, "--port", &port, "--chat-template"])
            .arg(file);
        if role == "frontend" {
            cmd.args(["--decode-workers", "127.0.0.1:1"]);
        }
        let out = cmd.env("RUST_LOG", "warn").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{role} started with {file:?}");
        assert!(
            stderr.contains(&file.display().to_string()) && stderr.contains(why),
            "{role}: {stderr}"
        );
        // Refused before any model was loaded.
        assert!(started.elapsed() < Duration::from_secs(10), "{role}");
    }
}
