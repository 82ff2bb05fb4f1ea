//! The operator the way its users run it: installed by the Helm chart, in a Pod started by the
//! local cluster's real node (kubelet, containerd, runc, CNI; scripts/local-cluster.sh) from the
//! image scripts/build-image.sh assembles from the Dockerfile, and workloads in Pods reading its
//! tokens from a mounted Secret.
//!
//! The node's Pods live in a network namespace of the cluster's own (scripts/lib/node.sh). The
//! tests reach into it only through `netns-forward`: into an operator Pod's namespace, so that
//! the operator reaches the emulator on 127.0.0.1 of that namespace (the emulator's certificate
//! names 127.0.0.1, so TLS is checked as for any ACS endpoint, with the emulator's CA given
//! through the chart's `extraCA`), and from the machine's loopback to a workload Pod, to read
//! the files it has mounted.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use crate::chart::{Release, find, kinds, render};
use crate::support::{
    Emulator, TestNamespace, admin_client, apply_identity, basic_spec, create_connection_secret,
    ensure_crd, kubeconfig, repo_root, secret_strings, wait_for, wait_ready,
};
use acs_identity_operator::crd::{CommunicationIdentity, REFRESH_REQUESTED_ANNOTATION, secret_key};

/// Starting a Pod (sandbox, CNI, container) on this node under load.
const POD_START: Duration = Duration::from_secs(120);
const NODE_NAME: &str = "acs-node";

/// The state folder of the run's cluster (the kubeconfig's folder).
fn state() -> &'static Path {
    kubeconfig()
        .parent()
        .expect("the kubeconfig is in the state folder")
}

fn node_file(name: &str) -> PathBuf {
    let path = std::fs::read_to_string(state().join("node").join(name))
        .unwrap_or_else(|e| panic!("{name} of the node (scripts/local-cluster.sh up): {e}"));
    PathBuf::from(path.trim())
}

/// Builds the operator image from the Dockerfile and loads it into the node, once per run; its
/// manifest digest.
fn operator_image_digest() -> &'static str {
    static DIGEST: OnceLock<String> = OnceLock::new();
    DIGEST.get_or_init(|| {
        let output = Command::new(repo_root().join("scripts/build-image.sh"))
            .env("ACS_DEV_DIR", state())
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/build-image.sh");
        assert!(output.status.success(), "scripts/build-image.sh failed");
        let digest = String::from_utf8(output.stdout).unwrap().trim().to_owned();
        assert!(digest.starts_with("sha256:"), "{digest}");
        digest
    })
}

/// A netns-forward process, stopped when dropped.
struct Forward {
    child: Child,
    addr: String,
}

impl Forward {
    /// Listens on `listen` in the namespace `listen_netns` (None: the machine's), copying each
    /// connection to `to` in `to_netns`.
    fn start(listen_netns: Option<&Path>, listen: &str, to_netns: Option<&Path>, to: &str) -> Self {
        let mut command = Command::new(node_file("netns-forward"));
        if let Some(netns) = listen_netns {
            command.arg("-listen-netns").arg(netns);
        }
        if let Some(netns) = to_netns {
            command.arg("-to-netns").arg(netns);
        }
        let mut child = command
            .args(["-listen", listen, "-to", to])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start netns-forward");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("netns-forward did not start: {line:?}"))
            .trim()
            .to_owned();
        Self { child, addr }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host pid of the operator container of Pod `namespace/name`: the process whose
/// environment has the chart's POD_NAME and POD_NAMESPACE.
fn operator_pid(namespace: &str, name: &str) -> Option<u32> {
    let want = [
        format!("POD_NAME={name}").into_bytes(),
        format!("POD_NAMESPACE={namespace}").into_bytes(),
    ];
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        want.iter()
            .all(|w| vars.contains(&w.as_slice()))
            .then_some(pid)
    })
}

/// `/proc/PID/status` field `key` (e.g. `Uid`, `CapEff`).
fn proc_status(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The mount options of `/` as process `pid` sees it.
fn root_mount_options(pid: u32) -> String {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    mountinfo
        .lines()
        .rev()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.get(4) == Some(&"/")).then(|| fields[5].to_owned())
        })
        .expect("a mount at /")
}

async fn running_pods(pods: &Api<Pod>, selector: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .collect()
}

fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("a running Pod has an IP")
}

async fn wait_pod_phase(pods: &Api<Pod>, name: &str, phase: &str) -> Pod {
    wait_for(&format!("Pod {name} to be {phase}"), POD_START, || async {
        let pod = pods.get(name).await.ok()?;
        let current = pod.status.as_ref()?.phase.clone()?;
        assert!(
            current == phase || current == "Pending" || current == "Running",
            "Pod {name} is {current}, expected {phase}: {:?}",
            pod.status
        );
        (current == phase).then_some(pod)
    })
    .await
}

async fn lease_holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases.get_opt(name).await.ok()??.spec?.holder_identity
}

/// A busybox Pod (the node's `acs-test/busybox:local`) running `script`.
fn busybox_pod(name: &str, script: &str, restart: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "app": name } },
        "spec": {
            "restartPolicy": restart,
            "automountServiceAccountToken": false,
            "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532 },
            "containers": [{
                "name": "main",
                "image": "acs-test/busybox:local",
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", script],
                "securityContext": {
                    "readOnlyRootFilesystem": true,
                    "allowPrivilegeEscalation": false,
                    "capabilities": { "drop": ["ALL"] },
                },
            }],
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn the_node_is_ready_and_runs_pods_without_pulling() {
    let client = admin_client().await;
    let node = Api::<Node>::all(client.clone())
        .get(NODE_NAME)
        .await
        .unwrap();
    let ready = node
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status);
    assert_eq!(ready.as_deref(), Some("True"));

    let ns = TestNamespace::new("node-pod").await;
    let pods: Api<Pod> = ns.api();
    // Scheduled by kube-scheduler (no nodeName given), with Pod networking and the kubernetes
    // Service reachable through kube-proxy.
    pods.create(
        &PostParams::default(),
        &busybox_pod(
            "hello",
            "case $(hostname -i) in 10.88.*) ;; *) exit 3;; esac; echo x | nc -w 5 10.0.0.1 443 >/dev/null",
            "Never",
        ),
    )
    .await
    .unwrap();
    let pod = wait_pod_phase(&pods, "hello", "Succeeded").await;
    assert_eq!(
        pod.spec.and_then(|s| s.node_name).as_deref(),
        Some(NODE_NAME)
    );

    // An image that is not on the node is never pulled: the Pod waits, and nothing leaves.
    let mut missing = busybox_pod("missing", "true", "Never");
    missing.spec.as_mut().unwrap().containers[0].image = Some("acs-test/absent:local".into());
    missing.spec.as_mut().unwrap().containers[0].image_pull_policy = Some("IfNotPresent".into());
    pods.create(&PostParams::default(), &missing).await.unwrap();
    wait_for("the missing image to fail its pull", POD_START, || async {
        let pod = pods.get("missing").await.ok()?;
        let waiting = pod
            .status?
            .container_statuses?
            .first()?
            .state
            .clone()?
            .waiting?;
        matches!(
            waiting.reason.as_deref(),
            Some("ErrImagePull" | "ImagePullBackOff")
        )
        .then_some(())
    })
    .await;
}

/// The chart's Deployment on the node: two replicas from the image, one leading; a workload
/// reads the token from its mounted Secret and sees a refresh; /metrics through the Service
/// from another Pod; deleting the leader Pod hands over to the other with no duplicate identity.
#[tokio::test]
async fn chart_runs_the_operator_on_the_node() {
    let digest = operator_image_digest();
    ensure_crd().await;
    let operator_ns = TestNamespace::new("node-ops").await;
    let app = TestNamespace::new("node-app").await;
    let emulator = Emulator::start(&[]);
    let emulator_port = emulator
        .endpoint
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    let ca_pem = std::fs::read_to_string(&emulator.ca_file).unwrap();
    let ca: ConfigMap = serde_json::from_value(json!({
        "metadata": { "name": "emulator-ca" }, "data": { "ca.crt": ca_pem }
    }))
    .unwrap();
    operator_ns
        .api::<ConfigMap>()
        .create(&PostParams::default(), &ca)
        .await
        .unwrap();

    let release = Release::install(
        &operator_ns.name,
        &[
            ("image.digest", digest),
            ("image.pullPolicy", "Never"),
            ("replicas", "2"),
            ("watchNamespace", &app.name),
            ("acsEndpointSuffixes", "127.0.0.1"),
            ("extraCA.configMap.name", "emulator-ca"),
        ],
    );
    let fullname = release.fullname();
    let deployments: Api<Deployment> = operator_ns.api();
    let start = Instant::now();
    wait_for(
        "the Deployment to be Available with 2 ready replicas",
        POD_START,
        || async {
            let status = deployments.get(&fullname).await.ok()?.status?;
            let available = status.conditions?.iter().any(|c| {
                c.type_.as_deref() == Some("Available") && c.status.as_deref() == Some("True")
            });
            (available && status.ready_replicas == Some(2)).then_some(())
        },
    )
    .await;
    eprintln!(
        "node: the chart's Deployment was Available after {:?}",
        start.elapsed()
    );

    // Each operator Pod reaches the emulator on its own 127.0.0.1, through a forward.
    let pods: Api<Pod> = operator_ns.api();
    let selector = format!("app.kubernetes.io/instance={}", release.name);
    let mut forwards = Vec::new();
    let mut forwarded = Vec::new();
    for pod in running_pods(&pods, &selector).await {
        let name = pod.name_any();
        let pid = wait_for("the operator process", PROMPTLY_PID, || async {
            operator_pid(&operator_ns.name, &name)
        })
        .await;
        // The container as the chart asks: UID 65532, no capabilities, read-only root.
        assert_eq!(
            proc_status(pid, "Uid").split_whitespace().next(),
            Some("65532")
        );
        assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
        assert!(
            root_mount_options(pid).split(',').any(|o| o == "ro"),
            "the root filesystem is writable"
        );
        let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let listen = format!("127.0.0.1:{emulator_port}");
        forwards.push(Forward::start(Some(&netns), &listen, None, &listen));
        forwarded.push(name);
    }
    assert_eq!(forwarded.len(), 2);

    let leases: Api<Lease> = operator_ns.api();
    let leader = wait_for("one replica to lead", PROMPTLY_PID, || async {
        lease_holder(&leases, &fullname).await
    })
    .await;
    assert!(
        forwarded.contains(&leader),
        "{leader} leads, not one of {forwarded:?}"
    );

    // An identity, and a workload that mounts its token Secret and serves the files.
    let secrets: Api<Secret> = app.api();
    create_connection_secret(&secrets, "acs-connection", &emulator.connection_string).await;
    let identities: Api<CommunicationIdentity> = app.api();
    apply_identity(&identities, "chat", basic_spec()).await;
    wait_ready(&identities, "chat", POD_START).await;
    let secret_name = "chat-acs-token";
    let token = secret_strings(&secrets.get(secret_name).await.unwrap())[secret_key::TOKEN].clone();

    let app_pods: Api<Pod> = app.api();
    let mut workload = busybox_pod(
        "workload",
        "exec httpd -f -p 8080 -h /var/run/acs",
        "Always",
    );
    let spec = workload.spec.as_mut().unwrap();
    spec.volumes = Some(vec![
        serde_json::from_value(json!({
            "name": "token", "secret": { "secretName": secret_name }
        }))
        .unwrap(),
    ]);
    spec.containers[0].volume_mounts = Some(vec![
        serde_json::from_value(json!({
            "name": "token", "mountPath": "/var/run/acs", "readOnly": true
        }))
        .unwrap(),
    ]);
    app_pods
        .create(&PostParams::default(), &workload)
        .await
        .unwrap();
    let workload = wait_pod_phase(&app_pods, "workload", "Running").await;
    let node_netns = node_file("netns");
    let files = Forward::start(
        None,
        "127.0.0.1:0",
        Some(&node_netns),
        &format!("{}:8080", pod_ip(&workload)),
    );
    let http = reqwest::Client::new();
    let read_mounted = |key: &'static str| {
        let url = format!("http://{}/{key}", files.addr);
        let http = http.clone();
        async move {
            let response = http.get(url).send().await.ok()?;
            response.status().is_success().then_some(())?;
            response.text().await.ok()
        }
    };
    let mounted = wait_for("the workload to serve its token file", PROMPTLY_PID, || {
        read_mounted(secret_key::TOKEN)
    })
    .await;
    assert_eq!(mounted, token, "the mounted token is the Secret's");
    assert_eq!(emulator.validate(&mounted).await["valid"], true);

    // A refresh: the Secret changes, and the mounted file follows within kubelet's sync.
    // Tokens carry whole-second times, so one minted in the same second as the current one
    // would be the same token: the refresh is asked for once that second is over (the token
    // lives 1 h, basic_spec's tokenLifetime).
    let expires: jiff::Timestamp = secret_strings(&secrets.get(secret_name).await.unwrap())
        [secret_key::EXPIRES_ON]
        .parse()
        .unwrap();
    let minted = expires.as_second() - 3600;
    wait_for(
        "the token's mint second to pass",
        Duration::from_secs(5),
        || async { (jiff::Timestamp::now().as_second() > minted).then_some(()) },
    )
    .await;
    identities
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": {
                REFRESH_REQUESTED_ANNOTATION: "node-test-1",
            }}})),
        )
        .await
        .unwrap();
    let new_token = wait_for("the Secret to hold a new token", PROMPTLY_PID, || async {
        let data = secret_strings(&secrets.get(secret_name).await.ok()?);
        let current = data.get(secret_key::TOKEN)?.clone();
        (current != token).then_some(current)
    })
    .await;
    let written = Instant::now();
    wait_for(
        "the mounted file to hold the new token",
        Duration::from_secs(120),
        || async { (read_mounted(secret_key::TOKEN).await? == new_token).then_some(()) },
    )
    .await;
    let delay = written.elapsed();
    eprintln!(
        "node: a refreshed token reached the mounted file {delay:?} after the Secret changed"
    );
    assert_eq!(emulator.validate(&new_token).await["valid"], true);

    // /metrics through the chart's Service, from another Pod (by ClusterIP: no cluster DNS).
    let service = operator_ns
        .api::<Service>()
        .get(&format!("{fullname}-metrics"))
        .await
        .unwrap();
    let ip = service.spec.unwrap().cluster_ip.unwrap();
    // (busybox's wget crashes without a libc in the image; nc speaks the HTTP request.) Tried
    // for up to 30 s: kube-proxy programs a new Service's rules asynchronously, and a first
    // connection can come before them.
    let scrape = format!(
        "for i in $(seq 30); do printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 8080 | grep -q '^acs_identity_operator_reconciles_total' && exit 0; sleep 1; done; exit 1"
    );
    let scraper = busybox_pod("scraper", &scrape, "Never");
    app_pods
        .create(&PostParams::default(), &scraper)
        .await
        .unwrap();
    wait_pod_phase(&app_pods, "scraper", "Succeeded").await;

    // Handover: delete the leader Pod; another replica takes the Lease (the leader releases it
    // on SIGTERM: the standby or the ReplicaSet's new Pod, whichever asks first).
    let alive_before = emulator.stats().await["identitiesAlive"].clone();
    pods.delete(&leader, &DeleteParams::default())
        .await
        .unwrap();
    let deleted = Instant::now();
    let new_leader = wait_for(
        "another replica to take the Lease",
        Duration::from_secs(60),
        || async {
            let holder = lease_holder(&leases, &fullname).await?;
            (!holder.is_empty() && holder != leader).then_some(holder)
        },
    )
    .await;
    let handover = deleted.elapsed();
    eprintln!("node: the Lease moved from {leader} to {new_leader} {handover:?} after the delete");
    assert!(
        handover < Duration::from_secs(15),
        "handover took {handover:?}, over the lease duration"
    );
    if !forwarded.contains(&new_leader) {
        let pid = wait_for("the new leader's process", POD_START, || async {
            operator_pid(&operator_ns.name, &new_leader)
        })
        .await;
        let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let listen = format!("127.0.0.1:{emulator_port}");
        forwards.push(Forward::start(Some(&netns), &listen, None, &listen));
    }
    // The new leader acts: a second identity becomes Ready, and the first is not duplicated.
    apply_identity(&identities, "chat2", basic_spec()).await;
    wait_ready(&identities, "chat2", POD_START).await;
    let stats = emulator.stats().await;
    assert_eq!(
        stats["identitiesAlive"].as_u64(),
        alive_before.as_u64().map(|n| n + 1),
        "{stats}"
    );
    drop(files);
    drop(forwards);
    drop(release);
}

const PROMPTLY_PID: Duration = Duration::from_secs(60);

/// The chart's production items, rendered: a PodDisruptionBudget with replicas > 1, the egress
/// NetworkPolicy, Recreate without leader election, the image by digest, the alerts and the
/// dashboard.
#[test]
fn chart_renders_disruption_budget_policy_strategy_and_monitoring() {
    let fullname = "r1-acs-identity-operator";
    let docs = render(&[]);
    assert!(!kinds(&docs).contains("PodDisruptionBudget"));
    assert!(!kinds(&docs).contains("NetworkPolicy"));
    assert_eq!(
        find(&docs, "Deployment", fullname)["spec"]["strategy"]["type"],
        "RollingUpdate"
    );

    let docs = render(&[("replicas", "2")]);
    let pdb = find(&docs, "PodDisruptionBudget", fullname);
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        find(&docs, "Deployment", fullname)["spec"]["selector"]["matchLabels"]
    );

    let docs = render(&[("leaderElection.enabled", "false")]);
    assert_eq!(
        find(&docs, "Deployment", fullname)["spec"]["strategy"]["type"],
        "Recreate"
    );

    let digest = format!("sha256:{}", "ab".repeat(32));
    let docs = render(&[("image.digest", &digest), ("image.tag", "ignored")]);
    assert_eq!(
        find(&docs, "Deployment", fullname)["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("acs-identity-operator@{digest}")
    );

    let docs = render(&[
        ("networkPolicy.enabled", "true"),
        ("networkPolicy.apiServer.cidrs[0]", "10.1.2.3/32"),
    ]);
    let policy = find(&docs, "NetworkPolicy", fullname);
    assert_eq!(policy["spec"]["policyTypes"], json!(["Egress"]));
    let egress = policy["spec"]["egress"].as_array().unwrap();
    assert_eq!(
        egress[0]["to"],
        json!([{ "ipBlock": { "cidr": "10.1.2.3/32" } }])
    );
    assert_eq!(
        egress[1]["ports"],
        json!([{ "protocol": "TCP", "port": 443 }])
    );
    assert!(egress[1].get("to").is_none(), "ACS: port 443 anywhere");

    let docs = render(&[
        ("prometheusRule.enabled", "true"),
        ("grafanaDashboard.enabled", "true"),
    ]);
    let rule = find(&docs, "PrometheusRule", fullname);
    let file: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(
            repo_root().join("charts/acs-identity-operator/files/prometheus-rules.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(rule["spec"]["groups"], file["groups"]);
    let dashboard = find(&docs, "ConfigMap", &format!("{fullname}-dashboard"));
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value = serde_json::from_str(
        dashboard["data"]["acs-identity-operator.json"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(json["uid"], "acs-identity-operator");
}
