//! Narrowing the supervisor once it has started: [`narrow`] enforces a
//! [`SupervisorProfile`](rampart_policy::supervisor::SupervisorProfile) on the calling process
//! (capabilities first, while CAP_SETPCAP is still effective, then landlock).

use std::str::FromStr;

use rampart_policy::supervisor::{PathAccess, SupervisorProfile};

use crate::{JailError, LandlockStatus};

/// What holds after [`narrow`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorReport {
    pub cap_effective: u64,
    pub cap_permitted: u64,
    pub cap_bounding: u64,
    pub landlock_status: LandlockStatus,
    /// Paths of the profile that do not exist here (skipped: nothing to allow).
    pub skipped: Vec<String>,
}

/// Keeps only the profile's capabilities (when the process has any to drop) and enters its
/// landlock rules. Threads started before this call are not narrowed: call it while the
/// process is single-threaded.
pub fn narrow(profile: &SupervisorProfile) -> Result<SupervisorReport, JailError> {
    narrow_capabilities(profile)?;
    let (landlock_status, skipped) = restrict_paths(profile)?;
    let caps = crate::read_capabilities();
    Ok(SupervisorReport {
        cap_effective: caps.0,
        cap_permitted: caps.1,
        cap_bounding: caps.3,
        landlock_status,
        skipped,
    })
}

fn narrow_capabilities(profile: &SupervisorProfile) -> Result<(), JailError> {
    use caps::{CapSet, Capability, CapsHashSet};
    let cap_error = |step| {
        move |e: caps::errors::CapsError| JailError::Capabilities {
            step,
            message: e.to_string(),
        }
    };
    let mut keep = CapsHashSet::new();
    for c in &profile.capabilities {
        let cap = Capability::from_str(c.name).map_err(|e| JailError::Capabilities {
            step: "capability name",
            message: format!("{}: {e}", c.name),
        })?;
        keep.insert(cap);
    }
    let permitted = caps::read(None, CapSet::Permitted).map_err(cap_error("read permitted"))?;
    // Unprivileged start: nothing to narrow (and the bounding set cannot be changed).
    if permitted.is_empty() {
        return Ok(());
    }
    // The bounding set shrinks only while CAP_SETPCAP is effective: first.
    let bounding = caps::read(None, CapSet::Bounding).map_err(cap_error("read bounding"))?;
    for cap in bounding.difference(&keep) {
        caps::drop(None, CapSet::Bounding, *cap).map_err(cap_error("bounding"))?;
    }
    caps::clear(None, CapSet::Ambient).map_err(cap_error("ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(cap_error("inheritable"))?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept).map_err(cap_error("effective"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(cap_error("permitted"))?;
    Ok(())
}

fn restrict_paths(profile: &SupervisorProfile) -> Result<(LandlockStatus, Vec<String>), JailError> {
    use landlock::{
        ABI, Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus,
    };
    let err = |e: landlock::RulesetError| JailError::Landlock(e.to_string());
    let level = if profile.require_landlock {
        CompatLevel::HardRequirement
    } else {
        CompatLevel::BestEffort
    };
    let abi = ABI::V7;
    let mut created = Ruleset::default()
        .set_compatibility(level)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?;
    let mut skipped = Vec::new();
    for rule in &profile.paths {
        let Ok(fd) = PathFd::new(&rule.path) else {
            skipped.push(rule.path.display().to_string());
            continue;
        };
        let is_dir = rule.path.is_dir();
        let access = match rule.access {
            PathAccess::Read => AccessFs::from_read(abi),
            PathAccess::Write => AccessFs::from_all(abi) & !AccessFs::Execute,
            PathAccess::Execute => AccessFs::from_read(abi) | AccessFs::Execute,
        };
        // Rules on a file may only name file rights.
        let access = if is_dir {
            access
        } else {
            access & AccessFs::from_file(abi)
        };
        created = created.add_rule(PathBeneath::new(fd, access)).map_err(err)?;
    }
    let status = created.restrict_self().map_err(err)?;
    let status = match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockStatus::FullyEnforced,
        RulesetStatus::PartiallyEnforced => LandlockStatus::PartiallyEnforced,
        RulesetStatus::NotEnforced => LandlockStatus::NotEnforced,
    };
    if profile.require_landlock && status != LandlockStatus::FullyEnforced {
        return Err(JailError::LandlockNotEnforced {
            status,
            abi: crate::landlock_abi(),
        });
    }
    Ok((status, skipped))
}
