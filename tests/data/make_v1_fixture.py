"""How tests/data/store_v1.h5 was made (kept for the record; do not re-run).

The file is a frozen store of the first released schemas (exposure v1,
parents v1, run v1). It must keep opening, and migrating, forever; a schema
change adds a new frozen store beside it instead of regenerating this one.

    scarletstore ingest store_v1.h5 ../shared/data/hsc_cosmos_35.npz
    scarletstore detect store_v1.h5
    scarletstore deblend store_v1.h5 --run v1 --set max_iter=20
"""
