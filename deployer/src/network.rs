//! The private network between lbs and nameservers (issue #21): each instance's address on the
//! deployment's VLAN, and the checks that make a VLAN possible before anything is created.
//!
//! Addresses come from `[network] subnet`, lowest free first, across old and `-next` instances
//! together: an address is free when no instance of the deployment carries it and no
//! allocation recorded in the journal holds it. Each allocation is recorded in the journal
//! before the create call that uses it, so a crash between the two cannot give the address to
//! a second instance (the retried create reuses it by label).
//!
//! A VLAN exists in one region, and only in regions that offer VLANs: a deployment whose
//! instances would land in several regions is refused by the config check, and one whose
//! region has no VLANs is refused here, naming the region, before anything is created. The
//! local provider keeps loopback (every instance is a process on 127.0.0.1) and says so.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{anyhow, bail, Result};

use crate::config::{ProviderKind, Subnet};
use crate::context::Deployer;
use crate::journal::{Journal, Operation, VlanAddress};
use crate::provider::{Instance, Role, VlanAttachment, VlanSupport};

/// The lowest host address of `subnet` that is not in `used`.
pub fn lowest_free(subnet: &Subnet, used: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    subnet.hosts().find(|a| !used.contains(a))
}

/// The VLAN attachment for the instance about to be created as `label`: the address the
/// journal already holds for it, or a newly allocated one, recorded (and saved) before it is
/// returned. `None` without a VLAN.
pub fn attachment(d: &Deployer, j: &mut Journal, label: &str) -> Result<Option<VlanAttachment>> {
    let Some(vlan) = d.vlan() else {
        return Ok(None);
    };
    let subnet = d.cfg.network.subnet;
    let attach = |address| {
        Some(VlanAttachment {
            label: vlan.to_string(),
            address,
            prefix_len: subnet.len,
        })
    };
    if let Some(a) = j.vlan_addresses.iter().find(|a| a.label == label) {
        return Ok(attach(a.address));
    }
    let mut used: Vec<Ipv4Addr> = j.vlan_addresses.iter().map(|a| a.address).collect();
    // The deployer's own address on the VLAN, when it checks from there.
    if let Some(IpAddr::V4(a)) = d.cfg.network.check_address {
        used.push(a);
    }
    used.extend(
        d.provider
            .list()?
            .iter()
            .filter_map(|i| match i.private_address {
                Some(IpAddr::V4(a)) => Some(a),
                _ => None,
            }),
    );
    let address = lowest_free(&subnet, &used).ok_or_else(|| {
        anyhow!(
            "no free address left in [network] subnet {subnet} for {label} ({} in use)",
            used.len()
        )
    })?;
    j.vlan_addresses.push(VlanAddress {
        label: label.to_string(),
        address,
    });
    d.save(j)?;
    Ok(attach(address))
}

/// Checks, before an operation creates anything, that its instances can be on the VLAN: the
/// region offers VLANs, the existing instances are in that region, and (for `roll`, whose new
/// nameservers take DNS on the VLAN only) every lb is on the VLAN already. Returns a notice to
/// print, if any.
pub fn preflight(d: &Deployer, op: Operation, existing: &[Instance]) -> Result<Option<String>> {
    let Some(vlan) = d.cfg.network.vlan.as_deref() else {
        return Ok(None);
    };
    if d.cfg.provider.kind == ProviderKind::Local {
        return Ok(Some(format!(
            "[network] vlan = \"{vlan}\" is not used by the local provider: every instance is a process on loopback, which is their private network"
        )));
    }
    if d.cfg.provider.kind == ProviderKind::Machines {
        // Every machine is on this host's private bridge: one "region".
        return Ok(None);
    }
    let region = d
        .cfg
        .vlan_region()
        .ok_or_else(|| anyhow!("[network] vlan needs a [linode] region"))?;
    match d.provider.vlan_support(&region)? {
        VlanSupport::Yes | VlanSupport::Loopback => {}
        VlanSupport::No { capabilities } => bail!(
            "region {region} does not offer VLANs (its capabilities: {}), so [network] vlan = \"{vlan}\" cannot be created there. Choose a region that offers VLANs, or remove [network] vlan: the lbs then reach the nameservers on their public addresses, and the nameservers' firewalls and allow-query admit the lbs' public addresses only",
            capabilities.join(", ")
        ),
    }
    for i in existing {
        if let Some(r) = i.region.as_deref().filter(|r| *r != region) {
            bail!(
                "{} (id {}) is in region {r}, but the VLAN {vlan} is in {region}: a VLAN spans one region only. Move the whole deployment (new instances in {r}, or `deployer down` and `up` in {region})",
                i.label,
                i.id
            );
        }
    }
    if op == Operation::Roll {
        let off: Vec<&str> = existing
            .iter()
            .filter(|i| i.role == Role::Lb && i.private_address.is_none())
            .map(|i| i.label.as_str())
            .collect();
        if !off.is_empty() {
            bail!(
                "lb {} is not on the VLAN {vlan} (created before [network] vlan was set), and the new nameservers take DNS on the VLAN only: run `deployer roll-lb` first to replace the lbs by ones on the VLAN, then `deployer roll`",
                off.join(", ")
            );
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_skips_every_address_in_use_and_stops_when_full() {
        let s: Subnet = "10.0.0.0/29".parse().unwrap();
        let a = |x: u8| Ipv4Addr::new(10, 0, 0, x);
        assert_eq!(lowest_free(&s, &[]), Some(a(1)));
        // Old instances hold 1 and 3; a -next instance gets 2, the next one 4.
        assert_eq!(lowest_free(&s, &[a(1), a(3)]), Some(a(2)));
        assert_eq!(lowest_free(&s, &[a(1), a(2), a(3)]), Some(a(4)));
        // An address outside the subnet changes nothing; a full subnet has none.
        assert_eq!(lowest_free(&s, &[Ipv4Addr::new(192, 0, 2, 1)]), Some(a(1)));
        assert_eq!(lowest_free(&s, &(1..=6).map(a).collect::<Vec<_>>()), None);
    }
}
