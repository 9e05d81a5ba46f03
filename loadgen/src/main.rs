//! `ringcast-loadgen`; everything is in the library ([`ringcast_loadgen::main`]).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    ringcast_loadgen::main()
}
