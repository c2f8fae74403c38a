from .ytvis import (YTVIS_CATEGORIES_2019, YTVIS_CATEGORIES_2021, YTVISDatasetMapper, load_ytvis_json,
                    register_ytvis, register_ytvis_instances)

__all__ = ["YTVIS_CATEGORIES_2019", "YTVIS_CATEGORIES_2021", "YTVISDatasetMapper", "load_ytvis_json",
           "register_ytvis", "register_ytvis_instances"]
