"""The examiner's gallery of known hands: an embedded SQLite database (see ``store``) filled by
``enrol``. ``handclip gallery add|info|remove`` call these functions."""
from handclip.gallery.enrol import EnrolItem, collect_images, enrol, read_manifest
from handclip.gallery.store import Gallery, GalleryRecord, ModelInfo, format_info

__all__ = ["EnrolItem", "Gallery", "GalleryRecord", "ModelInfo", "collect_images", "enrol", "format_info",
           "read_manifest"]
