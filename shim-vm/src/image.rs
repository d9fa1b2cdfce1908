//! TODO(helper): image
