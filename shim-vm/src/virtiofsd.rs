//! TODO(helper): virtiofsd
