//! `rampart state save|load|dump` and `rampart apply -f`: the supervisor computes the difference between the running state and the file's, the client shows it.

use super::*;

#[derive(Subcommand, Debug, Clone)]
pub enum StateAction {
    /// Save the state to a file of the supervisor's state directory.
    Save {
        /// Relative to the supervisor's state directory.
        path: String,
    },
    /// Replace the state with one saved in the supervisor's state directory.
    Load {
        /// Relative to the supervisor's state directory.
        path: String,
    },
    /// Print the requests that rebuild the running state, and its hash.
    Dump,
}

/// Warnings about what a plan does that a person may not expect: listeners it removes (their
/// connections close), with whether it adds them back (a protocol change).
pub(super) fn plan_warnings(plan: &proto::Plan) -> Vec<String> {
    let added: std::collections::BTreeSet<&str> = plan
        .requests
        .iter()
        .filter_map(|r| match &r.kind {
            Some(Kind::AddListener(l)) => Some(l.address.as_str()),
            _ => None,
        })
        .collect();
    plan.requests
        .iter()
        .filter_map(|r| match &r.kind {
            Some(Kind::RemoveListener(l)) if added.contains(l.address.as_str()) => Some(format!(
                "warning: listener {} changes protocol: it is removed and added again, closing its connections",
                l.address
            )),
            Some(Kind::RemoveListener(l)) => Some(format!(
                "warning: the file has no listener {}: it is removed and its connections are closed",
                l.address
            )),
            _ => None,
        })
        .collect()
}

/// One line per request of a plan, or "no change".
pub(super) fn plan_text(plan: &proto::Plan) -> String {
    if plan.requests.is_empty() {
        return "no change\n".to_string();
    }
    plan.requests.iter().map(|r| format!("{}\n", describe(r))).collect()
}

/// `apply -f`: sends the file's whole state; the supervisor computes the difference from the
/// running state (the same code as `state load`) and applies it as one atomic batch, or only
/// returns it with `--dry-run`. With `--expect-state`, it applies only to that running state.
/// The file is validated here first, so that its errors name its lines.
pub(super) fn apply(
    file: &Path,
    dry_run: bool,
    expect_state: Option<&str>,
    socket: &Path,
    json: bool,
    out: &mut dyn io::Write,
) -> Result<(), ClientError> {
    let target = Config::load(file)?.to_state()?;
    let mut requests = target.to_requests();
    if dry_run {
        // The difference needs no private key: a certificate is known by its fingerprint.
        for r in &mut requests {
            if let Some(Kind::AddCertificate(c)) = &mut r.kind {
                c.key.clear();
            }
        }
    }
    let mut client = Client::connect(socket)?;
    client.show_progress(!json);
    let response = client.call(request_of(Kind::ApplyState(proto::ApplyState {
        target: requests,
        base_state_hash: expect_state.unwrap_or_default().to_string(),
        dry_run,
    })))?;
    if json {
        print_out(out, &format!("{}\n", serde_json::to_string_pretty(&response)?))?;
        expect_ok(response)?;
        return Ok(());
    }
    let response = expect_ok(response)?;
    let Some(Content::Plan(plan)) = &response.content else {
        return Err(ClientError::MissingContent {
            kind: "apply_state",
            expected: "plan",
        });
    };
    for warning in plan_warnings(plan) {
        warn(&warning);
    }
    print_out(out, &plan_text(plan))?;
    let summary = if dry_run {
        format!(
            "dry run: nothing was applied; the running state is {}. Apply exactly this with `rampart apply -f {} --expect-state {}`\n",
            plan.base_state_hash,
            file.display(),
            plan.base_state_hash
        )
    } else if plan.applied {
        format!(
            "{}\nstate {} -> {}\n",
            response.message, plan.base_state_hash, plan.target_state_hash
        )
    } else {
        format!("{}\n", response.message)
    };
    print_out(out, &summary)
}
