//! `cnnfctl` against a real control plane: the mode, network objects,
//! rules, policy export and import, and every refusal a script must be
//! able to tell apart by exit code (bad arguments 2, not found 3,
//! unauthenticated or not allowed 4, conflict 5, unreachable 6), with a
//! read afterwards showing that a refused write changed nothing.

mod support;

use support::{ctl_at, Stack, ADMIN, BIN, OPERATOR, VIEWER};

fn names(list: &serde_json::Value, key: &str, field: &str) -> Vec<String> {
    list[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {list}"))
        .iter()
        .map(|item| item[field].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_objects_rules_export_import_and_refusals() {
    let stack = Stack::start().await;

    // Mode: unset is the product default; admin sets both modes.
    let mode = stack.json(VIEWER, &["mode", "get"]).await;
    assert_eq!(mode["mode"], "MODE_UNSPECIFIED", "{mode}");
    let table = stack.ctl(Some(VIEWER), &["mode", "get"]).await.expect(0).stdout;
    assert!(table.contains("mode:") && table.contains("disabled"), "{table}");
    stack.ctl(Some(ADMIN), &["mode", "set", "alert"]).await.expect(0);
    stack
        .ctl(Some(ADMIN), &["mode", "set", "prevent", "--host"])
        .await
        .expect(0);
    let mode = stack.json(VIEWER, &["mode", "get"]).await;
    assert_eq!(
        (mode["mode"].as_str(), mode["hostMode"].as_str()),
        (Some("MODE_ALERT"), Some("MODE_PREVENT"))
    );
    stack
        .ctl(Some(ADMIN), &["mode", "set", "learn", "--host"])
        .await
        .expect(0);
    assert_eq!(stack.json(VIEWER, &["mode", "get"]).await["hostMode"], "MODE_DISABLED");

    // Objects.
    let created = stack
        .json(OPERATOR, &["objects", "create", "db", "--image-id", "sha256:db"])
        .await;
    assert!(
        created["revision"].as_str().unwrap().parse::<u64>().unwrap() > 0,
        "{created}"
    );
    stack
        .ctl(Some(OPERATOR), &["objects", "create", "web", "--image-name", "web:*"])
        .await
        .expect(0);
    let out = stack
        .ctl(
            Some(OPERATOR),
            &[
                "objects",
                "create",
                "office",
                "--cidr",
                "192.0.2.0/24",
                "--cidr",
                "198.51.100.7",
            ],
        )
        .await
        .expect(0);
    assert!(
        out.stdout.contains("objects create office: done, policy revision"),
        "{out:?}"
    );
    stack
        .ctl(
            Some(OPERATOR),
            &["objects", "create", "db", "--image-id", "sha256:other"],
        )
        .await
        .fails(5, "already exists");
    let list = stack.json(VIEWER, &["objects", "list"]).await;
    assert_eq!(names(&list, "objects", "name"), ["db", "office", "web"]);
    let table = stack.ctl(Some(VIEWER), &["objects", "list"]).await.expect(0).stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("NAME    KIND    VALUE"), "{table}");
    assert!(
        lines[2].starts_with("office  subnet  192.0.2.0/24,198.51.100.7"),
        "{table}"
    );
    stack
        .ctl(
            Some(OPERATOR),
            &[
                "objects",
                "update",
                "office",
                "--cidr",
                "203.0.113.0/24",
                "--description",
                "the office",
            ],
        )
        .await
        .expect(0);
    let office = stack.json(VIEWER, &["objects", "show", "office"]).await;
    assert_eq!(office["cidrs"], serde_json::json!(["203.0.113.0/24"]), "{office}");
    assert_eq!(office["description"], "the office");
    assert_eq!(office["kind"], "KIND_SUBNET");
    stack
        .ctl(Some(VIEWER), &["objects", "show", "ghost"])
        .await
        .fails(3, "no object named \"ghost\"");
    stack
        .ctl(Some(OPERATOR), &["objects", "delete", "ghost"])
        .await
        .fails(3, "ghost");
    stack
        .ctl(
            Some(OPERATOR),
            &["objects", "update", "ghost", "--host-app", "x.service"],
        )
        .await
        .fails(3, "ghost");
    stack
        .ctl(Some(OPERATOR), &["objects", "create", "nothing"])
        .await
        .fails(2, "one of --image-id, --image-name, --cidr or --host-app");
    stack
        .ctl(Some(OPERATOR), &["objects", "create", "bad", "--cidr", "10.0.0.0/33"])
        .await
        .fails(2, "is not a CIDR");
    stack
        .ctl(
            Some(OPERATOR),
            &["objects", "create", "two", "--cidr", "10.0.0.0/8", "--host-app", "a"],
        )
        .await
        .fails(2, "--host-app");
    stack
        .ctl(
            Some(OPERATOR),
            &["objects", "create", "tmp", "--host-app", "tmp.service"],
        )
        .await
        .expect(0);
    stack.ctl(Some(OPERATOR), &["objects", "delete", "tmp"]).await.expect(0);
    stack
        .ctl(Some(VIEWER), &["objects", "show", "tmp"])
        .await
        .fails(3, "tmp");

    // Rules.
    stack
        .ctl(
            Some(OPERATOR),
            &[
                "rules", "create", "--id", "web-db", "--from", "web", "--to", "db", "--port", "5432", "--action",
                "allow", "--effect", "prevent",
            ],
        )
        .await
        .expect(0);
    // Default id; the destination named by the image ID its object holds.
    stack
        .ctl(
            Some(OPERATOR),
            &[
                "rules",
                "create",
                "--from",
                "web",
                "--to",
                "sha256:db",
                "--port",
                "22,8000-8080",
                "--allow-learned",
            ],
        )
        .await
        .expect(0);
    let rules = stack.json(VIEWER, &["rules", "list"]).await;
    assert_eq!(names(&rules, "rules", "id"), ["web-db", "web-sha256:db-22_8000-8080"]);
    let rule = stack
        .json(VIEWER, &["rules", "show", "web-sha256:db-22_8000-8080"])
        .await;
    assert_eq!(rule["destinations"][0]["object"], "db", "{rule}");
    assert_eq!(
        rule["destinations"][0]["ports"],
        serde_json::json!([{"first": 22}, {"first": 8000, "last": 8080}])
    );
    assert_eq!(rule["allowLearned"], true);
    assert_eq!(rule["effect"], "RULE_EFFECT_ALERT");
    let rule = stack.json(VIEWER, &["rules", "show", "web-db"]).await;
    assert_eq!(rule["effect"], "RULE_EFFECT_PREVENT", "{rule}");
    assert_eq!(rule["destinations"][0]["protocol"], "PROTOCOL_TCP");
    let table = stack.ctl(Some(VIEWER), &["rules", "list"]).await.expect(0).stdout;
    assert!(table.contains("web-db  ") && table.contains("db:5432/tcp"), "{table}");
    stack
        .ctl(
            Some(OPERATOR),
            &[
                "rules",
                "update",
                "web-db",
                "--effect",
                "alert",
                "--enabled",
                "false",
                "--to",
                "office",
                "--action",
                "prevent",
            ],
        )
        .await
        .expect(0);
    let rule = stack.json(VIEWER, &["rules", "show", "web-db"]).await;
    assert_eq!(rule["effect"], "RULE_EFFECT_ALERT", "{rule}");
    assert_eq!(rule["disabled"], true);
    assert_eq!(rule["destinations"][0]["object"], "office");
    assert_eq!(rule["destinations"][0]["effect"], "RULE_EFFECT_PREVENT");
    stack
        .ctl(Some(VIEWER), &["rules", "show", "ghost"])
        .await
        .fails(3, "no rule with id \"ghost\"");
    stack
        .ctl(Some(OPERATOR), &["rules", "update", "ghost", "--effect", "alert"])
        .await
        .fails(3, "ghost");
    stack
        .ctl(Some(OPERATOR), &["rules", "delete", "ghost"])
        .await
        .fails(3, "ghost");
    stack
        .ctl(Some(OPERATOR), &["rules", "create", "--from", "ghost", "--to", "db"])
        .await
        .fails(3, "no object named \"ghost\"");
    stack
        .ctl(
            Some(OPERATOR),
            &["rules", "create", "--id", "web-db", "--from", "web", "--to", "db"],
        )
        .await
        .fails(5, "already exists");
    stack
        .ctl(
            Some(OPERATOR),
            &["rules", "create", "--from", "web", "--to", "db", "--port", "70000"],
        )
        .await
        .fails(2, "--port");
    stack
        .ctl(
            Some(OPERATOR),
            &["rules", "create", "--from", "web", "--effect", "maybe"],
        )
        .await
        .fails(2, "--effect");
    stack
        .ctl(Some(OPERATOR), &["rules", "update", "web-db"])
        .await
        .fails(2, "nothing to change");
    stack
        .ctl(
            Some(OPERATOR),
            &["rules", "create", "--id", "tmp", "--from", "web", "--to", "db"],
        )
        .await
        .expect(0);
    stack.ctl(Some(OPERATOR), &["rules", "delete", "tmp"]).await.expect(0);
    stack.ctl(Some(VIEWER), &["rules", "show", "tmp"]).await.fails(3, "tmp");

    // Conflict: a write based on a revision that moved changes nothing.
    let revision: u64 = stack.json(VIEWER, &["mode", "get"]).await["revision"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    stack
        .ctl(
            Some(OPERATOR),
            &["objects", "delete", "office", "--revision", &(revision - 1).to_string()],
        )
        .await
        .fails(5, "stale");
    stack.json(VIEWER, &["objects", "show", "office"]).await;
    stack
        .ctl(
            Some(ADMIN),
            &["mode", "set", "prevent", "--revision", &(revision - 2).to_string()],
        )
        .await
        .fails(5, "stale");
    assert_eq!(stack.json(VIEWER, &["mode", "get"]).await["mode"], "MODE_ALERT");

    // Export: the document on stdout, a rule, Kubernetes to a file.
    let exported = stack.ctl(Some(VIEWER), &["policy", "export"]).await.expect(0).stdout;
    let document: serde_json::Value = serde_json::from_str(&exported).unwrap();
    assert_eq!(document["schema"], "cnnf.policy/v1");
    assert_eq!(document["kind"], "policy");
    assert_eq!(document["mode"], "alert");
    assert_eq!(document["objects"].as_array().unwrap().len(), 3);
    let rule_doc = stack
        .ctl(Some(VIEWER), &["policy", "export", "--rule", "web-db"])
        .await
        .expect(0)
        .stdout;
    let rule_doc: serde_json::Value = serde_json::from_str(&rule_doc).unwrap();
    assert_eq!(
        (rule_doc["kind"].as_str(), rule_doc["rule"]["id"].as_str()),
        (Some("rule"), Some("web-db"))
    );
    stack
        .ctl(Some(VIEWER), &["policy", "export", "--rule", "ghost"])
        .await
        .fails(3, "ghost");
    let k8s = stack.path("netpol.yaml");
    let k8s_text = k8s.to_str().unwrap();
    let summary = stack
        .json(VIEWER, &["policy", "export", "--format", "kubernetes", "-o", k8s_text])
        .await;
    assert_eq!(summary["file"], k8s_text, "{summary}");
    assert_eq!(summary["revision"].as_str().unwrap(), revision.to_string());
    let yaml = support::read(&k8s);
    assert_eq!(summary["bytes"].as_u64().unwrap() as usize, yaml.len());
    let policy_file = stack.path("policy.json");
    stack
        .ctl(Some(VIEWER), &["policy", "export", "-o", policy_file.to_str().unwrap()])
        .await
        .expect(0);
    assert_eq!(support::read(&policy_file), exported);

    // Refusals: no token, a wrong token, the viewer writing, the operator
    // doing what needs admin. Nothing changes.
    let server = stack.server.clone();
    ctl_at(&server, None, &["mode", "get"])
        .await
        .fails(4, "unauthenticated");
    ctl_at(&server, Some("not-a-token"), &["objects", "list"])
        .await
        .fails(4, "");
    let token_file = stack.path("viewer.token");
    std::fs::write(&token_file, format!("{VIEWER}\n")).unwrap();
    ctl_at(
        &server,
        None,
        &["--token-file", token_file.to_str().unwrap(), "rules", "list"],
    )
    .await
    .expect(0);
    ctl_at(
        &server,
        None,
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "rules",
            "delete",
            "web-db",
        ],
    )
    .await
    .fails(4, "permission denied");
    let rule_file = stack.path("rule.json");
    let mut copy = rule_doc.clone();
    copy["rule"]["id"] = "web-db-copy".into();
    std::fs::write(&rule_file, serde_json::to_vec(&copy).unwrap()).unwrap();
    let rule_file = rule_file.to_str().unwrap();
    let policy_path = policy_file.to_str().unwrap();
    let writes: Vec<Vec<&str>> = vec![
        vec!["mode", "set", "prevent"],
        vec!["objects", "create", "x", "--cidr", "10.1.0.0/16"],
        vec!["objects", "update", "office", "--description", "changed"],
        vec!["objects", "delete", "office"],
        vec!["rules", "create", "--id", "x", "--from", "web", "--to", "db"],
        vec!["rules", "update", "web-db", "--effect", "prevent"],
        vec!["rules", "delete", "web-db"],
        vec!["policy", "import", policy_path],
        vec!["policy", "import", "--rule", rule_file],
    ];
    for args in &writes {
        stack.ctl(Some(VIEWER), args).await.fails(4, "permission denied");
        stack.ctl(None, args).await.fails(4, "unauthenticated");
    }
    for args in [&writes[0], &writes[7]] {
        stack.ctl(Some(OPERATOR), args).await.fails(4, "needs role admin");
    }
    let after = stack.ctl(Some(VIEWER), &["policy", "export"]).await.expect(0).stdout;
    assert_eq!(after, exported, "a refused write changed the policy");

    // Import: a rule document adds a rule; a whole policy replaces.
    stack
        .ctl(Some(ADMIN), &["policy", "import", "--rule", rule_file])
        .await
        .expect(0);
    let rules = stack.json(VIEWER, &["rules", "list"]).await;
    assert!(
        names(&rules, "rules", "id").contains(&"web-db-copy".to_owned()),
        "{rules}"
    );
    stack
        .ctl(Some(ADMIN), &["policy", "import", "--rule", policy_path])
        .await
        .fails(2, "not a single-rule document");
    let mut replaced = document.clone();
    replaced["mode"] = "prevent".into();
    replaced["rules"] = serde_json::json!([]);
    let replaced_file = stack.path("replaced.json");
    std::fs::write(&replaced_file, serde_json::to_vec_pretty(&replaced).unwrap()).unwrap();
    stack
        .ctl(Some(ADMIN), &["policy", "import", replaced_file.to_str().unwrap()])
        .await
        .expect(0);
    assert_eq!(stack.json(VIEWER, &["mode", "get"]).await["mode"], "MODE_PREVENT");
    assert!(stack.json(VIEWER, &["rules", "list"]).await["rules"]
        .as_array()
        .unwrap()
        .is_empty());
    let mut invalid = document.clone();
    invalid["objects"][1]["cidrs"] = serde_json::json!(["10.2.0.0/33"]);
    let invalid_file = stack.path("invalid.json");
    std::fs::write(&invalid_file, serde_json::to_vec_pretty(&invalid).unwrap()).unwrap();
    stack
        .ctl(Some(ADMIN), &["policy", "import", invalid_file.to_str().unwrap()])
        .await
        .fails(2, "$.objects[1].cidrs[0]");
    stack
        .ctl(
            Some(ADMIN),
            &["policy", "import", stack.path("missing.json").to_str().unwrap()],
        )
        .await
        .fails(3, "missing.json");
    assert_eq!(stack.json(VIEWER, &["mode", "get"]).await["mode"], "MODE_PREVENT");

    // Connection problems.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    ctl_at(&format!("http://{closed}"), Some(VIEWER), &["mode", "get"])
        .await
        .fails(6, "connecting to");
    ctl_at("not a url", Some(VIEWER), &["mode", "get"])
        .await
        .fails(2, "--server");
    ctl_at(&format!("https://{closed}"), Some(VIEWER), &["mode", "get"])
        .await
        .fails(2, "--ca-cert");

    // TLS and mutual TLS through a second gateway in front of the same services.
    let pki = support::write_pki(stack.dir.path(), "ops-laptop");
    let tls = stack.start_tls_gateway(&pki).await;
    let ca = pki.ca.to_str().unwrap();
    let mode = support::eventually("the TLS gateway to answer", || async {
        let out = ctl_at(
            &tls,
            Some(VIEWER),
            &["--ca-cert", ca, "--output", "json", "mode", "get"],
        )
        .await;
        (out.code == 0).then(|| out.json())
    })
    .await;
    assert_eq!(mode["mode"], "MODE_PREVENT");
    let client = [
        "--ca-cert",
        ca,
        "--client-cert",
        pki.client_cert.to_str().unwrap(),
        "--client-key",
        pki.client_key.to_str().unwrap(),
    ];
    let mut create = client.to_vec();
    create.extend(["objects", "create", "via-mtls", "--cidr", "192.0.2.99"]);
    ctl_at(&tls, None, &create).await.expect(0);
    stack.json(VIEWER, &["objects", "show", "via-mtls"]).await;
    let mut mode_set = client.to_vec();
    mode_set.extend(["mode", "set", "alert"]);
    ctl_at(&tls, None, &mode_set).await.fails(4, "needs role admin");
    ctl_at(&tls, None, &["--ca-cert", ca, "mode", "get"])
        .await
        .fails(4, "unauthenticated");
    let other = pki.other_ca.to_str().unwrap();
    ctl_at(&tls, Some(VIEWER), &["--ca-cert", other, "mode", "get"])
        .await
        .fails(6, "certificate");
    ctl_at(
        &tls,
        Some(VIEWER),
        &["--ca-cert", stack.path("none.pem").to_str().unwrap(), "mode", "get"],
    )
    .await
    .fails(2, "--ca-cert");

    stack.stop().await;
}

/// What needs no server: help, usage errors, completions.
#[tokio::test]
async fn help_usage_errors_and_completions() {
    let server = "http://127.0.0.1:9";
    let help = ctl_at(server, None, &["--help"]).await.expect(0).stdout;
    assert!(
        help.contains("Exit codes:") && help.contains("6  the gateway"),
        "{help}"
    );
    for command in [
        "mode",
        "objects",
        "rules",
        "models",
        "learned",
        "policy",
        "audits",
        "replay",
        "simulate",
        "who-held",
        "state-at",
        "completions",
    ] {
        assert!(help.contains(command), "--help lacks {command}");
        let out = ctl_at(server, None, &[command, "--help"]).await.expect(0);
        assert!(out.stdout.contains("Usage: cnnfctl"), "{out:?}");
    }
    let out = ctl_at(server, None, &["rules", "create", "--help"]).await.expect(0);
    assert!(out.stdout.contains("cnnfctl rules create --id web-db"), "{out:?}");
    ctl_at(server, None, &["frobnicate"]).await.fails(2, "frobnicate");
    ctl_at(server, None, &["mode", "set", "sometimes"])
        .await
        .fails(2, "sometimes");
    ctl_at(server, None, &["models", "extend", "sha256:x", "--by", "soon"])
        .await
        .fails(2, "--by");
    ctl_at(server, None, &["audits", "list", "--since", "yesterday"])
        .await
        .fails(2, "--since");
    ctl_at(server, None, &["audits", "list", "--limit", "5000"])
        .await
        .fails(2, "--limit");
    ctl_at(server, None, &["--output", "xml", "mode", "get"])
        .await
        .fails(2, "--output");
    ctl_at(server, None, &["who-held"]).await.fails(2, "<ADDRESS>");
    for shell in ["bash", "zsh", "fish"] {
        let out = ctl_at(server, None, &["completions", shell]).await.expect(0);
        assert!(
            out.stdout.contains("cnnfctl") && out.stdout.contains("who-held"),
            "{shell}: {out:?}"
        );
    }
    ctl_at(server, None, &["completions", "tcsh"]).await.fails(2, "tcsh");
    let version = ctl_at(server, None, &["--version"]).await.expect(0).stdout;
    assert!(version.starts_with("cnnfctl "), "{version}");
    let _ = BIN;
}
