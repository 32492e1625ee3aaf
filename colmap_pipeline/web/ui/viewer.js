// The 3D viewer of a completed job (three.js, served from node_modules through the import map):
// the sparse point cloud (coloured), the cameras as frustums along their path, and the dense
// cloud and mesh when the job has them. Frames: transforms.json and sparse_pc.ply are in
// nerfstudio's world frame (z up); sparse.ply, fused.ply and mesh.glb are in COLMAP's, and are
// shown through transforms.json's applied_transform (the same rotation) so all layers line up.
import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import { PLYLoader } from "three/addons/loaders/PLYLoader.js";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";

// nerfstudio's applied_transform: COLMAP world (x, y, z) -> (x, z, -y)
const NERFSTUDIO_APPLIED = [[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0]];
// layers loaded at once up to this size; larger ones when their box is ticked
const AUTO_LOAD_BYTES = 64 * 1024 * 1024;
const BACKGROUND = 0x3b424c;
const FRUSTUM_COLOUR = 0xff9f1c;
const PATH_COLOUR = 0xffe066;

function matrixFrom3x4(rows) {
  const m = new THREE.Matrix4();
  m.set(...rows[0], ...rows[1], ...rows[2], 0, 0, 0, 1);
  return m;
}

/** Robust bounds of a point cloud: per-axis 2nd-98th percentiles (sparse clouds have strays). */
function robustBounds(positions) {
  const n = positions.count;
  const step = Math.max(1, Math.floor(n / 20000));
  const axes = [[], [], []];
  for (let i = 0; i < n; i += step) {
    axes[0].push(positions.getX(i)); axes[1].push(positions.getY(i)); axes[2].push(positions.getZ(i));
  }
  const lo = new THREE.Vector3(), hi = new THREE.Vector3();
  axes.forEach((a, k) => {
    a.sort((p, q) => p - q);
    lo.setComponent(k, a[Math.floor(0.02 * (a.length - 1))]);
    hi.setComponent(k, a[Math.ceil(0.98 * (a.length - 1))]);
  });
  return new THREE.Box3(lo, hi);
}

function pointsFrom(geometry, size) {
  const material = new THREE.PointsMaterial({ size, sizeAttenuation: false,
                                              vertexColors: geometry.hasAttribute("color") });
  if (!geometry.hasAttribute("color")) material.color.set(0xdddddd);
  return new THREE.Points(geometry, material);
}

/** Frustum depth: 1.5 times the median step between consecutive cameras, kept within
 * 2-5 % of the scene's size (so a dense path does not become a solid block). */
function frustumDepth(transforms, radius) {
  const c = [...(transforms.frames || [])]
    .sort((a, b) => String(a.file_path).localeCompare(String(b.file_path)))
    .filter((f) => f.transform_matrix)
    .map((f) => new THREE.Vector3(f.transform_matrix[0][3], f.transform_matrix[1][3], f.transform_matrix[2][3]));
  const steps = c.slice(1).map((p, i) => p.distanceTo(c[i])).sort((a, b) => a - b);
  const median = steps.length ? steps[Math.floor(steps.length / 2)] : radius;
  return Math.min(radius * 0.05, Math.max(radius * 0.02, median * 1.5));
}

/** Frustums (apex at the camera centre, image plane at distance `depth`) and the path through
 * the camera centres in file order, from nerfstudio's transforms.json. */
function camerasFrom(transforms, depth) {
  const frames = [...(transforms.frames || [])].sort((a, b) => String(a.file_path).localeCompare(String(b.file_path)));
  const lines = [];
  const centres = [];
  const looks = [];
  for (const f of frames) {
    const w = f.w ?? transforms.w, h = f.h ?? transforms.h;
    const fx = f.fl_x ?? transforms.fl_x, fy = f.fl_y ?? transforms.fl_y ?? fx;
    if (!w || !h || !fx || !f.transform_matrix) continue;
    const m = new THREE.Matrix4().fromArray(f.transform_matrix.flat()).transpose();
    const sx = (w / 2 / fx) * depth, sy = (h / 2 / fy) * depth;
    // OpenGL camera axes: x right, y up, looking down -z
    const local = [[0, 0, 0], [-sx, -sy, -depth], [sx, -sy, -depth], [sx, sy, -depth], [-sx, sy, -depth]];
    const p = local.map(([x, y, z]) => new THREE.Vector3(x, y, z).applyMatrix4(m));
    for (const [a, b] of [[0, 1], [0, 2], [0, 3], [0, 4], [1, 2], [2, 3], [3, 4], [4, 1]]) lines.push(p[a], p[b]);
    // the top edge twice as a small "up" tick
    const upMid = p[3].clone().add(p[4]).multiplyScalar(0.5);
    lines.push(upMid, upMid.clone().addScaledVector(new THREE.Vector3(0, 1, 0).transformDirection(m), depth * 0.25));
    centres.push(p[0]);
    looks.push(new THREE.Vector3(0, 0, -1).transformDirection(m));
  }
  const group = new THREE.Group();
  group.add(new THREE.LineSegments(new THREE.BufferGeometry().setFromPoints(lines),
                                   new THREE.LineBasicMaterial({ color: FRUSTUM_COLOUR })));
  if (centres.length > 1) {
    group.add(new THREE.Line(new THREE.BufferGeometry().setFromPoints(centres),
                             new THREE.LineBasicMaterial({ color: PATH_COLOUR })));
  }
  return { group, centres, looks, count: centres.length };
}

/**
 * Build the viewer in `box`, its layer toggles in `layersBox`.
 * `layers`: {sparse, transforms, dense, mesh}: artifacts ({name, url, bytes}) or null.
 * `fetchBytes(url)`: the artifact's bytes as an ArrayBuffer (sends the API key).
 * Returns {dispose(), stats()}.
 */
export async function createViewer(box, layersBox, layers, fetchBytes) {
  const renderer = new THREE.WebGLRenderer({ antialias: true, preserveDrawingBuffer: true });
  renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
  const width = () => Math.max(200, box.clientWidth);
  const height = () => Math.max(200, box.clientHeight);
  renderer.setSize(width(), height());
  box.append(renderer.domElement);
  renderer.domElement.setAttribute("aria-label", "3D view of the reconstruction");
  const scene = new THREE.Scene();
  scene.background = new THREE.Color(BACKGROUND);
  scene.add(new THREE.HemisphereLight(0xffffff, 0x444444, 2.0));
  const sun = new THREE.DirectionalLight(0xffffff, 1.5);
  sun.position.set(1, -1, 2);
  scene.add(sun);
  const camera = new THREE.PerspectiveCamera(50, width() / height(), 0.01, 1000);
  camera.up.set(0, 0, 1);
  const controls = new OrbitControls(camera, renderer.domElement);
  const render = () => renderer.render(scene, camera);
  controls.addEventListener("change", render);
  const resize = new ResizeObserver(() => {
    renderer.setSize(width(), height());
    camera.aspect = width() / height();
    camera.updateProjectionMatrix();
    render();
  });
  resize.observe(box);

  let transforms = null;
  if (layers.transforms) {
    transforms = JSON.parse(new TextDecoder().decode(await fetchBytes(layers.transforms.url)));
  }
  const colmapFrame = new THREE.Group();  // COLMAP-world layers, shown in nerfstudio's frame
  colmapFrame.matrixAutoUpdate = false;
  colmapFrame.matrix.copy(matrixFrom3x4((transforms && transforms.applied_transform) || NERFSTUDIO_APPLIED));
  scene.add(colmapFrame);

  const stats = { points: 0, cameras: 0, dense_points: 0, mesh_triangles: 0 };
  const toggles = [];
  const toggle = (label, object, checked = true) => {
    const input = Object.assign(document.createElement("input"), { type: "checkbox", checked });
    const lab = document.createElement("label");
    lab.append(input, ` ${label}`);
    layersBox.append(lab);
    input.addEventListener("change", async () => {
      if (typeof object === "function") object = await object();
      if (object) object.visible = input.checked;
      render();
    });
    toggles.push(input);
    return input;
  };

  const ply = new PLYLoader();
  let bounds = null;
  if (layers.sparse) {
    const geometry = ply.parse(await fetchBytes(layers.sparse.url));
    const cloud = pointsFrom(geometry, 4);
    (layers.sparse.name === "sparse_pc.ply" ? scene : colmapFrame).add(cloud);
    stats.points = geometry.getAttribute("position").count;
    colmapFrame.updateMatrixWorld(true);
    bounds = robustBounds(geometry.getAttribute("position"));
    if (cloud.parent === colmapFrame) bounds.applyMatrix4(colmapFrame.matrix);
    toggle(`sparse points (${stats.points})`, cloud);
  }
  let cams = null;
  if (transforms) {
    const size = bounds ? bounds.getSize(new THREE.Vector3()).length() / 2 : 1;
    cams = camerasFrom(transforms, frustumDepth(transforms, Math.max(1e-3, size)));
    scene.add(cams.group);
    stats.cameras = cams.count;
    toggle(`cameras (${cams.count})`, cams.group);
    bounds = cams.centres.reduce((b, c) => b.expandByPoint(c), bounds || new THREE.Box3());
  }
  const centre = bounds ? bounds.getCenter(new THREE.Vector3()) : new THREE.Vector3();
  const radius = bounds ? Math.max(1e-3, bounds.getSize(new THREE.Vector3()).length() / 2) : 1;

  const lazy = (artifact, build) => {
    let made = null;
    const make = async () => {
      if (!made) made = await build(await fetchBytes(artifact.url));
      render();
      return made;
    };
    const auto = artifact.bytes <= AUTO_LOAD_BYTES;
    toggle(`${artifact.name} (${(artifact.bytes / 1048576).toFixed(1)} MiB)`, make, auto);
    return auto ? make : null;
  };
  const pending = [];
  if (layers.dense) {
    const go = lazy(layers.dense, (buf) => {
      const geometry = ply.parse(buf);
      stats.dense_points = geometry.getAttribute("position").count;
      const cloud = pointsFrom(geometry, 1.5);
      colmapFrame.add(cloud);
      return cloud;
    });
    if (go) pending.push(go());
  }
  if (layers.mesh) {
    const go = lazy(layers.mesh, (buf) => new Promise((resolve, reject) => {
      new GLTFLoader().parse(buf, "", (gltf) => {
        gltf.scene.traverse((o) => {
          if (o.isMesh) {
            const idx = o.geometry.index;
            stats.mesh_triangles += (idx ? idx.count : o.geometry.getAttribute("position").count) / 3;
            if (o.material) o.material.side = THREE.DoubleSide;
          }
        });
        colmapFrame.add(gltf.scene);
        resolve(gltf.scene);
      }, reject);
    }));
    if (go) pending.push(go());
  }

  // start above and behind the cameras, looking the way they looked (the scene as filmed),
  // far enough for the bounding sphere to fit the field of view
  const distance = radius / Math.sin(THREE.MathUtils.degToRad(camera.fov / 2));
  const from = new THREE.Vector3(1, -1, 0.8);
  if (cams && cams.looks.length) {
    const look = cams.looks.reduce((s, d) => s.add(d), new THREE.Vector3());
    look.z = 0;  // its horizontal part (z is up)
    if (look.lengthSq() > 1e-12) from.copy(look.normalize().negate()).setZ(0.7);
  }
  const eye = centre.clone().addScaledVector(from.normalize(), 0.85 * distance);
  camera.position.copy(eye);
  camera.near = radius / 1000;
  camera.far = radius * 100;
  camera.updateProjectionMatrix();
  controls.target.copy(centre);
  controls.update();
  render();
  await Promise.all(pending);
  render();
  for (const [k, v] of Object.entries(stats)) box.dataset[k.replace(/_(.)/g, (_, c) => c.toUpperCase())] = String(v);
  box.dataset.ready = "true";

  return {
    stats: () => ({ ...stats }),
    dispose() {
      resize.disconnect();
      controls.dispose();
      scene.traverse((o) => {
        if (o.geometry) o.geometry.dispose();
        if (o.material) o.material.dispose();
      });
      renderer.dispose();
      renderer.domElement.remove();
    },
  };
}
