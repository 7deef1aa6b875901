//! `cnnfctl` against a real control plane fed with agent events: models
//! and learned connections (list, show, extend, lock, relearn, delete one),
//! the viewer refused on every model command, and the audit questions
//! (list with filters and paging, tail, replay, simulate, who-held,
//! state-at).

mod support;

use std::process::Stdio;
use std::time::Duration;

use cnnf_proto::v1 as pb;
use support::{by_mode, by_model, decision, image, now, unknown, Stack, OPERATOR, S, VIEWER};
use tokio::io::AsyncReadExt as _;

const WEB: &str = "sha256:web";
const DB: &str = "sha256:db";
const WEB_IP: &str = "10.0.0.1";
const DB_IP: &str = "10.0.0.2";

/// A list of a proto3 JSON answer; an empty list is left out of the JSON.
fn array(value: &serde_json::Value, key: &str) -> Vec<serde_json::Value> {
    match &value[key] {
        serde_json::Value::Null => Vec::new(),
        list => list
            .as_array()
            .unwrap_or_else(|| panic!("{key} is no list in {value}"))
            .clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_learned_audits_and_forensics() {
    let stack = Stack::start().await;
    let t0 = now() - 60 * S;
    stack.start_workload("n1", "c-web", WEB, "web:1", WEB_IP, t0).await;
    stack.start_workload("n1", "c-db", DB, "db:16", DB_IP, t0).await;
    let web = || (image(WEB, "web:1"), WEB_IP);
    let db = || (image(DB, "db:16"), DB_IP);
    stack
        .publish_decisions(
            "n1",
            1,
            t0 + S,
            vec![
                decision(web(), db(), 5432, pb::Verdict::Learn, by_model(WEB), t0 + S),
                decision(
                    web(),
                    (unknown(), "203.0.113.9"),
                    23,
                    pb::Verdict::Alert,
                    by_mode(),
                    t0 + S,
                ),
                decision(web(), db(), 22, pb::Verdict::Prevent, by_model(DB), t0 + S),
            ],
        )
        .await;

    // Models.
    let models = support::eventually("two models with learned connections", || async {
        let models = stack.json(VIEWER, &["models", "list"]).await;
        let list = array(&models, "models");
        (list.len() == 2 && list.iter().any(|m| m["imageId"] == WEB && m["outboundCount"] == "2")).then_some(list)
    })
    .await;
    assert!(
        models.iter().all(|m| m["state"] == "MODEL_STATE_LEARNING"),
        "{models:?}"
    );
    let table = stack.ctl(Some(VIEWER), &["models", "list"]).await.expect(0).stdout;
    assert!(table.starts_with("IMAGE       NAME   STATE"), "{table}");
    assert!(table.contains("sha256:web  web:1  learning"), "{table}");
    let shown = stack.json(VIEWER, &["models", "show", "web:1"]).await;
    assert_eq!(shown["imageId"], WEB, "a model found by its image name");
    let ends: i64 = shown["learningEndsUnixNanos"].as_str().unwrap().parse().unwrap();
    stack
        .ctl(Some(VIEWER), &["models", "show", "sha256:ghost"])
        .await
        .fails(3, "sha256:ghost");

    let learned = stack
        .json(VIEWER, &["learned", "list", WEB, "--side", "outbound"])
        .await;
    let connections = array(&learned, "connections");
    // The unknown peer is not learned: an address that matched nothing.
    assert_eq!(connections.len(), 2, "{learned}");
    let filtered = stack
        .json(VIEWER, &["learned", "list", WEB, "--port", "5432", "--peer", DB])
        .await;
    assert_eq!(array(&filtered, "connections").len(), 1, "{filtered}");
    assert_eq!(filtered["connections"][0]["peer"]["id"], DB);
    let table = stack.ctl(Some(VIEWER), &["learned", "list", DB]).await.expect(0).stdout;
    assert!(table.contains("inbound") && table.contains(WEB), "{table}");

    // The viewer may not command models; nothing changes.
    for args in [
        vec!["models", "lock", WEB],
        vec!["models", "extend", WEB, "--by", "1h"],
        vec!["models", "relearn", WEB],
        vec![
            "learned", "delete", WEB, "--peer", DB, "--port", "5432", "--side", "outbound",
        ],
    ] {
        stack.ctl(Some(VIEWER), &args).await.fails(4, "permission denied");
        stack.ctl(None, &args).await.fails(4, "unauthenticated");
    }
    let unchanged = stack.json(VIEWER, &["models", "show", WEB]).await;
    assert_eq!(unchanged, shown, "a refused command changed the model");

    // Extend, delete one learned connection, lock, relearn.
    let extended = stack.json(OPERATOR, &["models", "extend", WEB, "--by", "2h"]).await;
    let new_end: i64 = extended["extended"]["learningEndsUnixNanos"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(new_end >= ends + 2 * 3600 * S - 5 * S, "{extended}");
    support::eventually("learning extended", || async {
        let shown = stack.json(VIEWER, &["models", "show", WEB]).await;
        (shown["learningEndsUnixNanos"]
            .as_str()
            .and_then(|s| s.parse::<i64>().ok())
            == Some(new_end))
        .then_some(())
    })
    .await;
    let out = stack
        .ctl(
            Some(OPERATOR),
            &[
                "learned", "delete", WEB, "--peer", DB, "--port", "5432", "--side", "outbound",
            ],
        )
        .await
        .expect(0);
    assert!(out.stdout.contains("learned connection deleted"), "{out:?}");
    support::eventually("the learned connection gone", || async {
        let learned = stack.json(VIEWER, &["learned", "list", WEB, "--port", "5432"]).await;
        array(&learned, "connections").is_empty().then_some(())
    })
    .await;
    stack
        .ctl(
            Some(OPERATOR),
            &[
                "learned", "delete", WEB, "--peer", DB, "--port", "5432", "--side", "outbound",
            ],
        )
        .await
        .fails(3, "no learned outbound connection");
    stack
        .ctl(
            Some(OPERATOR),
            &[
                "learned", "delete", WEB, "--peer", DB, "--port", "22", "--side", "sideways",
            ],
        )
        .await
        .fails(2, "--side");
    stack.ctl(Some(OPERATOR), &["models", "lock", WEB]).await.expect(0);
    support::eventually("the model enforcing", || async {
        (stack.json(VIEWER, &["models", "show", WEB]).await["state"] == "MODEL_STATE_ENFORCING").then_some(())
    })
    .await;
    stack
        .ctl(Some(OPERATOR), &["models", "lock", WEB])
        .await
        .fails(5, "already enforces");
    stack
        .ctl(Some(OPERATOR), &["models", "extend", WEB, "--by", "1h"])
        .await
        .fails(5, "already enforces");
    stack
        .ctl(Some(OPERATOR), &["models", "lock", "sha256:ghost"])
        .await
        .fails(3, "ghost");
    stack
        .ctl(Some(OPERATOR), &["models", "relearn", "web:1"])
        .await
        .expect(0);
    support::eventually("the model learning again, empty", || async {
        let m = stack.json(VIEWER, &["models", "show", WEB]).await;
        // proto3 JSON leaves zero counts out.
        (m["state"] == "MODEL_STATE_LEARNING" && m.get("outboundCount").is_none()).then_some(())
    })
    .await;

    // Audits: the alert and the prevent.
    let all = support::eventually("two audits", || async {
        let list = stack.json(VIEWER, &["audits", "list", "--since", "10m"]).await;
        let audits = array(&list, "audits");
        (audits.len() == 2).then_some(audits)
    })
    .await;
    let verdicts: Vec<_> = all.iter().map(|a| a["verdict"].as_str().unwrap()).collect();
    assert!(
        verdicts.contains(&"VERDICT_ALERT") && verdicts.contains(&"VERDICT_PREVENT"),
        "{all:?}"
    );
    let prevent = stack
        .json(VIEWER, &["audits", "list", "--since", "10m", "--verdict", "prevent"])
        .await;
    assert_eq!(array(&prevent, "audits").len(), 1);
    assert_eq!(prevent["audits"][0]["destination"]["port"], 22);
    let by_mode_list = stack
        .json(VIEWER, &["audits", "list", "--since", "10m", "--decided-by", "mode"])
        .await;
    assert_eq!(array(&by_mode_list, "audits").len(), 1);
    assert_eq!(by_mode_list["audits"][0]["verdict"], "VERDICT_ALERT");
    let db_list = stack
        .json(VIEWER, &["audits", "list", "--since", "10m", "--image", DB])
        .await;
    assert_eq!(array(&db_list, "audits").len(), 1);
    let none = stack
        .json(VIEWER, &["audits", "list", "--since", "10m", "--node", "n9"])
        .await;
    assert!(array(&none, "audits").is_empty());
    let old = stack
        .json(VIEWER, &["audits", "list", "--since", "30m", "--until", "20m"])
        .await;
    assert!(array(&old, "audits").is_empty());
    // Paging: one at a time, by token, or everything.
    let first = stack
        .json(VIEWER, &["audits", "list", "--since", "10m", "--limit", "1"])
        .await;
    assert_eq!(array(&first, "audits").len(), 1);
    let token = first["nextPageToken"].as_str().unwrap().to_owned();
    assert!(!token.is_empty(), "{first}");
    let second = stack
        .json(
            VIEWER,
            &[
                "audits",
                "list",
                "--since",
                "10m",
                "--limit",
                "1",
                "--page-token",
                &token,
            ],
        )
        .await;
    assert_eq!(array(&second, "audits").len(), 1);
    assert_ne!(second["audits"][0]["auditId"], first["audits"][0]["auditId"]);
    let everything = stack
        .json(VIEWER, &["audits", "list", "--since", "10m", "--limit", "1", "--all"])
        .await;
    assert_eq!(array(&everything, "audits"), all);
    let table = stack
        .ctl(Some(VIEWER), &["audits", "list", "--since", "10m", "--limit", "1"])
        .await
        .expect(0)
        .stdout;
    assert!(
        table.starts_with("FIRST-SEEN") && table.contains("more: --page-token"),
        "{table}"
    );
    stack
        .ctl(Some(VIEWER), &["audits", "list", "--page-token", "garbage"])
        .await
        .fails(2, "page_token");

    // Tail: follows new audits until --count.
    let mut tail = tokio::process::Command::new(support::BIN)
        .env("CNNFCTL_SERVER", &stack.server)
        .env("CNNFCTL_TOKEN", VIEWER)
        .args([
            "audits",
            "tail",
            "--count",
            "1",
            "--output",
            "json",
            "--verdict",
            "alert",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut seq = 10;
    let status = loop {
        if let Some(status) = tail.try_wait().unwrap() {
            break status;
        }
        assert!(seq < 400, "audits tail never printed an audit");
        seq += 1;
        let t = now();
        let port = 1000 + u32::try_from(seq).unwrap();
        stack
            .publish_decisions(
                "n1",
                seq,
                t,
                vec![decision(
                    web(),
                    (unknown(), "203.0.113.9"),
                    port,
                    pb::Verdict::Alert,
                    by_mode(),
                    t,
                )],
            )
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let mut stdout = String::new();
    tail.stdout.take().unwrap().read_to_string(&mut stdout).await.unwrap();
    assert!(status.success(), "tail: {status} {stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let tailed: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(tailed["verdict"], "VERDICT_ALERT", "{tailed}");
    assert_eq!(tailed["source"]["address"], WEB_IP, "{tailed}");

    // Replay the first decisions' window.
    let since = support::format_time(t0 - 10 * S);
    let until = support::format_time(t0 + 10 * S);
    let replay = stack
        .json(VIEWER, &["replay", "--since", &since, "--until", &until])
        .await;
    let replayed = array(&replay, "audits");
    assert_eq!(replayed.len(), 2, "{replay}");
    let ids = |list: &[serde_json::Value]| {
        let mut ids: Vec<String> = list.iter().map(|a| a["auditId"].as_str().unwrap().to_owned()).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&replayed), ids(&all), "a replay rebuilds the live audits");
    let table = stack
        .ctl(Some(VIEWER), &["replay", "--since", &since, "--until", &until])
        .await
        .expect(0)
        .stdout;
    assert!(table.contains("2 audits from"), "{table}");

    // Simulate: a candidate that allows web -> anything on 23 and 22.
    let candidate = serde_json::json!({
        "version": 2,
        "mode": "prevent",
        "host_mode": "disabled",
        "objects": [
            {"name": "web", "kind": "image", "image_id": WEB},
            {"name": "db", "kind": "image", "image_id": DB},
            {"name": "net", "kind": "subnet", "cidrs": ["0.0.0.0/0"]}
        ],
        "rules": [
            {"id": "r", "source": "web", "effect": "prevent",
             "destinations": [{"object": "net", "ports": ["22", "23"], "protocol": "tcp"}], "enabled": true}
        ],
        "models": [
            {"image_id": WEB, "state": "enforcing", "outbound": [], "inbound": []},
            {"image_id": DB, "state": "enforcing", "outbound": [], "inbound": []}
        ]
    });
    let candidate_file = stack.path("candidate.json");
    std::fs::write(&candidate_file, serde_json::to_vec(&candidate).unwrap()).unwrap();
    let candidate_path = candidate_file.to_str().unwrap();
    let simulated = stack
        .json(
            VIEWER,
            &[
                "simulate",
                "--candidate",
                candidate_path,
                "--since",
                &since,
                "--until",
                &until,
            ],
        )
        .await;
    let changes = array(&simulated, "changes");
    assert!(
        changes
            .iter()
            .any(|c| c["port"] == 23 && c["recorded"] == "VERDICT_ALERT" && c["simulated"] == "VERDICT_ALLOW"),
        "{simulated}"
    );
    assert!(
        changes
            .iter()
            .any(|c| c["port"] == 5432 && c["recorded"] == "VERDICT_LEARN" && c["simulated"] == "VERDICT_PREVENT"),
        "{simulated}"
    );
    let table = stack
        .ctl(
            Some(VIEWER),
            &[
                "simulate",
                "--candidate",
                candidate_path,
                "--since",
                &since,
                "--until",
                &until,
            ],
        )
        .await
        .expect(0)
        .stdout;
    assert!(table.contains("connections would change"), "{table}");
    std::fs::write(&candidate_file, b"{\"mode\": \"sometimes\"}").unwrap();
    stack
        .ctl(
            Some(VIEWER),
            &["simulate", "--candidate", candidate_path, "--since", "10m"],
        )
        .await
        .fails(2, "");
    stack
        .ctl(
            Some(VIEWER),
            &[
                "simulate",
                "--candidate",
                stack.path("nope.json").to_str().unwrap(),
                "--since",
                "10m",
            ],
        )
        .await
        .fails(3, "nope.json");

    // Who held an address; the state at an instant.
    let held = support::eventually("the address history", || async {
        let held = stack.json(VIEWER, &["who-held", WEB_IP]).await;
        (!array(&held, "holdings").is_empty()).then_some(held)
    })
    .await;
    assert_eq!(held["holdings"][0]["workload"]["containerId"], "c-web", "{held}");
    let before = support::format_time(t0 - 5 * S);
    let nobody = stack
        .ctl(Some(VIEWER), &["who-held", WEB_IP, "--at", &before])
        .await
        .expect(0)
        .stdout;
    assert!(nobody.starts_with("nothing held 10.0.0.1"), "{nobody}");
    stack.ctl(Some(VIEWER), &["who-held", "not-an-ip"]).await.fails(2, "");
    let state = support::eventually("the models in the state", || async {
        let state = stack.json(VIEWER, &["state-at", "now"]).await;
        let models = array(&state, "models");
        let web_relearning = models
            .iter()
            .any(|m| m["imageId"] == WEB && m["state"] == "MODEL_STATE_LEARNING");
        (models.len() == 2 && web_relearning).then_some(state)
    })
    .await;
    assert_eq!(state["mode"], serde_json::Value::Null, "no policy was written: {state}");
    let table = stack.ctl(Some(VIEWER), &["state-at", "now"]).await.expect(0).stdout;
    assert!(table.contains("policy revision:") && table.contains("MODEL"), "{table}");

    stack.stop().await;
}
