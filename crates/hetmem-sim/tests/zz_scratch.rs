mod common;
use common::*;
use hetmem::Prot;

#[test]
fn probe_remap_region() {
    let _f = Hmm::new(PRIVATE);
    let mut lost = 0;
    for c in 0..200 {
        let mut b = Buffer::anon(BUFFER_SIZE, Prot::RW, false);
        let a = b.ptr;
        b.free();
        let b2 = Buffer::anon(BUFFER_SIZE, Prot::RW, false);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let present = mm().region_of(hetmem_core::VirtAddr(b2.ptr)).is_some();
        if !present {
            lost += 1;
            if lost < 5 {
                eprintln!("round {c}: same addr {} region lost", a == b2.ptr);
            }
        }
    }
    eprintln!("lost {lost}/200");
}
