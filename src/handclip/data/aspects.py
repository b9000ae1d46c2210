"""Aspect keys and the protocol constants of the published hand re-ID work."""

ASPECTS_11K = ("dorsal_r", "dorsal_l", "palmar_r", "palmar_l")
ASPECT_HD = "hd"
ALL_ASPECTS = ASPECTS_11K + (ASPECT_HD,)

# HandInfo.csv's aspectOfHand → our key.
ASPECT_FROM_11K_LABEL = {
    "dorsal right": "dorsal_r",
    "dorsal left": "dorsal_l",
    "palmar right": "palmar_r",
    "palmar left": "palmar_l",
}
# train_all = subject ids <= this threshold; test = the rest (MBA-Net / GPA-Net protocol).
TRAIN_ID_THRESHOLD_11K = {"dorsal_r": 1050, "dorsal_l": 1037, "palmar_r": 1051, "palmar_l": 1042}
TRAIN_ID_THRESHOLD_HD = 447
# Offsets the published code adds to other aspects' ids in gallery_i_all.
GALLERY_ALL_OFFSETS = (11000000, 21000000, 31000000)
# Which dataset's id space an aspect's subject ids belong to: 11k and HD ids overlap numerically.
DATASET_OF_ASPECT = {**{aspect: "11k" for aspect in ASPECTS_11K}, ASPECT_HD: "hd"}
