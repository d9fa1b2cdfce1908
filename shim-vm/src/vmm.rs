//! TODO(helper): vmm
