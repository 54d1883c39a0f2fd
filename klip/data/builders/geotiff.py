"""GeoTIFF georeferencing: the chip centre (lat, lon) and ground pixel spacing from the tags.

Reads ModelTiepoint + ModelPixelScale (no rotation) with a geographic CRS (lon/lat degrees) or a
WGS 84 UTM projection (EPSG 326zz north / 327zz south, inverted here: sub-metre accurate within
the zone). Other CRSs raise SkipError: give lat/lon in the manifest instead.
"""

from __future__ import annotations

import math

import tifffile

from klip.data.builders import sources

_A = 6378137.0             # WGS 84 semi-major axis, m
_F = 1 / 298.257223563     # WGS 84 flattening
_K0 = 0.9996               # UTM scale factor on the central meridian
_M_PER_DEG = 111_320.0     # metres per degree of latitude (mean), for geographic pixel scales


def utm_to_latlon(easting: float, northing: float, zone: int, north: bool) -> tuple[float, float]:
  """WGS 84 UTM -> (lat, lon) degrees (Snyder, Map Projections, eqs. 8-18 to 8-25)."""
  e2 = _F * (2 - _F)
  ep2 = e2 / (1 - e2)
  x = easting - 500_000.0
  y = northing if north else northing - 10_000_000.0
  mu = y / _K0 / (_A * (1 - e2 / 4 - 3 * e2 ** 2 / 64 - 5 * e2 ** 3 / 256))
  e1 = (1 - math.sqrt(1 - e2)) / (1 + math.sqrt(1 - e2))
  phi = (mu + (3 * e1 / 2 - 27 * e1 ** 3 / 32) * math.sin(2 * mu)
         + (21 * e1 ** 2 / 16 - 55 * e1 ** 4 / 32) * math.sin(4 * mu)
         + 151 * e1 ** 3 / 96 * math.sin(6 * mu) + 1097 * e1 ** 4 / 512 * math.sin(8 * mu))
  sin, cos, tan = math.sin(phi), math.cos(phi), math.tan(phi)
  n = _A / math.sqrt(1 - e2 * sin ** 2)
  r = _A * (1 - e2) / (1 - e2 * sin ** 2) ** 1.5
  t, c = tan ** 2, ep2 * cos ** 2
  d = x / (n * _K0)
  lat = phi - n * tan / r * (d ** 2 / 2 - (5 + 3 * t + 10 * c - 4 * c ** 2 - 9 * ep2) * d ** 4 / 24
                             + (61 + 90 * t + 298 * c + 45 * t ** 2 - 252 * ep2 - 3 * c ** 2)
                             * d ** 6 / 720)
  lon = (d - (1 + 2 * t + c) * d ** 3 / 6
         + (5 - 2 * c + 28 * t - 3 * c ** 2 + 8 * ep2 + 24 * t ** 2) * d ** 5 / 120) / cos
  return math.degrees(lat), (zone - 1) * 6 - 180 + 3 + math.degrees(lon)


def centre_and_spacing(path: str) -> tuple[float, float, float]:
  """(lat, lon, pixel spacing in metres) of a GeoTIFF's centre; SkipError when the file has no
  usable georeferencing."""
  try:
    with tifffile.TiffFile(path) as tif:
      geo = tif.geotiff_metadata
      height, width = tif.pages[0].shape[:2]
  except Exception as e:  # any TIFF decoder error means a corrupt file
    raise sources.SkipError(f"cannot read GeoTIFF tags: {e}") from e
  if not geo or "ModelTiepoint" not in geo or "ModelPixelScale" not in geo:
    raise sources.SkipError("no GeoTIFF georeferencing (ModelTiepoint/ModelPixelScale): give "
                            "lat and lon in the manifest")
  i, j, _, x0, y0, _ = geo["ModelTiepoint"][:6]
  sx, sy = geo["ModelPixelScale"][:2]
  x = x0 + (width / 2 - i) * sx
  y = y0 - (height / 2 - j) * sy
  model = int(geo.get("GTModelTypeGeoKey", 0))
  epsg = int(geo.get("ProjectedCSTypeGeoKey", 0))
  if model == 2:  # geographic: x = lon, y = lat in degrees
    return y, x, math.sqrt(sx * sy * math.cos(math.radians(y))) * _M_PER_DEG
  if model == 1 and (32601 <= epsg <= 32660 or 32701 <= epsg <= 32760):
    lat, lon = utm_to_latlon(x, y, epsg % 100, epsg < 32700)
    return lat, lon, math.sqrt(sx * sy)
  raise sources.SkipError(f"GeoTIFF CRS (model type {model}, EPSG {epsg}) is neither geographic "
                          "nor WGS 84 UTM: give lat, lon and pixel_spacing_m in the manifest")
