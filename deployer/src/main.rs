//! `deployer`: blue-green rollouts of authoritative nameservers behind `lb`.

fn main() {
    eprintln!("deployer: not built yet (see the deployer issue)");
    std::process::exit(2);
}
