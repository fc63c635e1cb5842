"""A public word list of radiology English (chest imaging first), written for this project.

The builtin LM's `radiology` vocabulary (`model.lm_vocabulary`) makes each of these words one
token, so real reports ("hilar", "costophrenic", "cardiomediastinal") do not fall apart into
characters. It is general knowledge of how radiology reports are written (anatomy, findings,
devices, procedures, hedging and comparison language, plain English function words), grouped
by theme; no center's reports were read to write it. Inflected forms are listed as they occur.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_WORDS = """
a about above absence absent accentuated accentuates accentuation according across acute
acutely additional additionally adequate adequately adjacent after again against age
ago all allowing along already also although amount an and another anterior anteriorly any
apparent apparently appear appearance appearing appears approximately are area areas around
as assess assessed assessment associated at attention available average away
background based be because been before behind being below beneath best better between beyond
both but by can cannot case cause caused causes center central certain change changed changes
characterization characterize characterized clear clearly clinical clinically close closely
comparable compare compared comparison compatible complete completely concern concerning
concerns consider considered consistent contour contours correlate correlation could
currently date day days decrease decreased decreasing definite definitely degree demonstrate
demonstrated demonstrates demonstrating dependent described description despite detected
difference different difficult direct directly distinct distribution do does done due during
each earlier early either elsewhere end entire entirely equivocal especially essentially
established evaluate evaluated evaluation even evidence evident exam examination examinations
except excluded exclude expected extending extends extent extensive far favor favored
favors few findings finding first focally follow followed following for from full fully
further given good greater greatest gross grossly had has have having here high higher
however identified identify if image images imaged imaging improve improved improvement
improving in include included includes including increase increased increasing indeterminate
indicate indicated indicates indicating indicative inferior inferiorly interval into is
isolated it its itself just known large larger largely largest last late later least less
level levels like likely limit limited limits little located location long longer low lower
made main mainly major many marked markedly may measure measured measures measuring
minimal minimally minor mixed moderate moderately more most mostly much multiple must near
nearly necessary need new newly next no non none nor normal normally not noted nothing now
obscured obscures obscuring observed obtained obvious of off old on once one only or other
otherwise over overall overlying part partial partially particularly patient patients per
performed perhaps persist persistent persistently persists place placed placement portion
portions position positioned positioning possible possibly post potential potentially
present presumably presumed previous previously primarily prior probable probably
prominence prominent question questionable radiograph radiographic radiographically
radiographs range rather re recent recently recommend recommended redemonstrated
redemonstration reflect reflecting reflects regard regarding region regions related relative
relatively remain remainder remained remaining remains represent representing represents
resolved resolution result resulting same secondary seem seen several severe severely shown
significant significantly similar similarly since single site size sized slight slightly
small smaller so some somewhat specific stable status still study subtle subtly such
suggest suggested suggesting suggestive suggests superimposed superimposition superior
superiorly suspected suspicion suspicious than that the their them then there these they this
those three through throughout time times to too total trace two unchanged unclear under
underlying unless unlikely until unremarkable up upon usual versus very via view views
visible visualization visualized was were what when where whereas which while with within
without worse worsened worsening would yet

acquired adult aged analysis approach attempted available clinician called communicated
conveyed discussed emergency findings follow-up history indication informed notified
ordering physician provider reason referring reported request requested results telephone
verbal verbally
one two three four five six seven eight nine ten eleven twelve first second third fourth
fifth sixth seventh eighth ninth tenth eleventh twelfth half double single multiple
millimeter millimeters centimeter centimeters mm cm

frontal lateral lateral decubitus upright erect semi semiupright supine portable bedside
pa ap oblique lordotic apical expiratory inspiratory inspiration expiration rotated rotation
rotational penetrated underpenetrated overpenetrated technique technical positioning
projection projections exposure motion artifact artifacts quality diagnostic limited
suboptimal nondiagnostic chest thorax thoracic xray radiography cxr ct mri ultrasound pet
fluoroscopy scan scans contrast noncontrast enhanced enhancement dedicated film films

heart cardiac cardio cardiomediastinal silhouette silhouettes mediastinum mediastinal
mediastinal hilum hila hilar perihilar pericardial pericardium atrium atria atrial
ventricle ventricles ventricular right left aorta aortic arch knob knuckle ascending
descending thoracic abdominal root valve valves valvular mitral tricuspid pulmonic
pulmonary pulmonic vasculature vascular vascularity vessel vessels vein veins venous artery
arteries arterial trunk caval cava superior inferior azygos azygous brachiocephalic
subclavian jugular innominate carotid vertebral trachea tracheal carina carinal bronchus
bronchi bronchial bronchiole bronchioles esophagus esophageal thyroid thymus thymic
paratracheal paraspinal paravertebral prevascular retrosternal retrocardiac subcarinal
aortopulmonary window stripe line lines border borders contour margin margins junction
cavoatrial atriocaval lung lungs pulmonary parenchyma parenchymal lobe lobes lobar upper
middle lower lingula lingular apex apices apical apicoposterior base bases basal basilar
bibasilar biapical segment segments segmental subsegmental zone zones field fields midlung
midzone periphery peripheral peripherally central centrally hemithorax hemithoraces
costophrenic cardiophrenic angle angles sulcus sulci recess fissure fissures minor major
interlobar pleura pleural pleurae subpleural diaphragm diaphragms diaphragmatic
hemidiaphragm hemidiaphragms dome domes airway airways alveolar alveoli interstitium
interstitial septal septa interlobular hilus airspace airspaces

bone bones osseous bony skeletal skeleton structures structure rib ribs costal chondral
costochondral sternum sternal manubrium clavicle clavicles clavicular scapula scapulae
scapular shoulder shoulders humerus humeral head heads glenohumeral acromioclavicular
acromion coracoid spine spinal vertebra vertebrae vertebral body bodies endplate endplates
disc discs disk intervertebral cervical lumbar thoracolumbar cervicothoracic kyphosis
kyphotic scoliosis scoliotic levoscoliosis dextroscoliosis curvature lordosis alignment
osteopenia osteopenic osteoporosis osteoporotic demineralization demineralized osteophyte
osteophytes osteophytic spondylosis spondylotic degenerative degeneration arthritis
arthritic arthropathy hypertrophic sclerosis sclerotic lytic blastic lucency lucent
fracture fractures fractured healed healing nondisplaced displaced displacement deformity
deformities deformed compression wedge wedging height loss collapse callus remote chronic
acute subacute old new posterior lateral anterior axillary arc neck ankylosing
syndesmophytes bridging vertebroplasty kyphoplasty cement

soft tissue tissues subcutaneous emphysema breast breasts nipple nipples shadow shadows
mastectomy axilla axillary chest wall abdomen abdominal upper quadrant stomach gastric
bubble bowel colon colonic liver hepatic spleen splenic gallbladder cholecystectomy kidney
renal free air pneumoperitoneum intraperitoneal subdiaphragmatic neck
cervical supraclavicular thyroid goiter

normal abnormal abnormality abnormalities unremarkable clear clearing cleared negative
positive active inactive acute chronic stable unstable unchanged changed improved worsened
new old resolved resolving persistent residual minimal mild mildly moderate moderately
severe severely marked markedly small tiny trace large massive extensive diffuse diffusely
focal focally multifocal patchy patchily scattered streaky linear nodular reticular
reticulonodular hazy ill defined well circumscribed irregular spiculated lobulated rounded
round oval tubular confluent dense density densities increased decreased
prominent enlarged enlargement engorged engorgement dilated dilation dilatation tortuous
tortuosity ectatic ectasia unfolded unfolding calcified calcification calcifications
calcific noncalcified atherosclerotic atherosclerosis atheromatous plaque plaques
expanded expansion hyperexpanded hyperexpansion hyperinflated hyperinflation inflated
inflation underinflated volume volumes elevated elevation eventration flattened flattening
flat blunted blunting thickened thickening obscured obscuration silhouetting shift shifted
deviation deviated midline widened widening narrowed narrowing crowding crowded
accentuated hyperlucent hyperlucency lucency opacified opacification opaque radiopaque
radiodense radiolucent

opacity opacities consolidation consolidations consolidative consolidated infiltrate
infiltrates infiltration infiltrative airspace disease diseases process processes
pneumonia pneumonias pneumonitis infection infections infectious infected aspiration
bronchopneumonia atelectasis atelectases atelectatic discoid platelike plate collapse
collapsed scarring scar scars fibrosis fibrotic fibronodular honeycombing bronchiectasis
bronchiectatic bronchitis bronchial wall cuffing peribronchial edema edematous oedema
congestion congestive congested cephalization redistribution kerley overload fluid
effusion effusions hydropneumothorax hemothorax empyema loculated loculation
subpulmonic layering meniscus pneumothorax pneumothoraces pneumomediastinum
pneumopericardium tension collapse emphysema emphysematous bullous bulla bullae bleb blebs
cyst cysts cystic cavity cavities cavitary cavitation copd obstructive restrictive asthma
granuloma granulomas granulomatous histoplasmosis tuberculosis tb healed sequelae
nodule nodules nodular mass masses lesion lesions tumor tumors neoplasm neoplastic
malignancy malignant metastasis metastases metastatic carcinoma cancer lymphoma
lymphadenopathy adenopathy lymph node nodes pleural plaque plaques asbestos
cardiomegaly cardiomyopathy hypertrophy hypertrophic failure chf aneurysm aneurysmal
dissection hernia hiatal hiatus diaphragmatic bochdalek morgagni achalasia
sarcoidosis sarcoid interstitial lung disease ild ards hemorrhage contusion contusions
laceration trauma traumatic injury injuries embolism embolus infarct infarction
pneumoconiosis silicosis mucus plugging plug impaction obstruction obstructing
postobstructive postinflammatory inflammatory inflammation reactive reaction

tube tubes line lines catheter catheters device devices hardware wire wires wiring lead
leads pacemaker pacer defibrillator icd aicd pacing generator battery pack pad pads
electrode electrodes monitoring monitor endotracheal tracheostomy enteric nasogastric
orogastric feeding dobhoff drain drains drainage pigtail chest picc port portacath
central venous internal external jugular subclavian femoral swan ganz introducer sheath
dialysis hemodialysis tunneled tip tips terminates terminating termination terminate
projects projecting projection overlies overlying coursing courses courses extends
extending side hole sidehole balloon pump iabp impella stent stents stenting graft grafts
grafting bypass cabg coronary sternotomy thoracotomy thoracostomy lobectomy pneumonectomy
wedge resection resected surgical surgery postsurgical postoperative preoperative
operative clips clip staples suture sutures marker markers prosthesis prosthetic valve
replacement repair annuloplasty ring arthroplasty fixation plate screw screws rod rods
orif kyphoplasty vertebroplasty embolization coil coils filter ivc loop recorder
esophagectomy gastrectomy fundoplication band tavr tavi mitraclip watchman occluder
cerclage ecg telemetry leads removed removal interval placement repositioned advanced
withdrawn retracted satisfactory appropriate standard expected good malpositioned

impression findings recommendation recommendations comparison technique history indication
conclusion summary note notes exam examination report reports
dyspnea cough fever pain chest shortness breath hypoxia sob tachycardia trauma fall
preop preoperative screening evaluation rule out assessment routine surveillance

bilateral bilaterally unilateral unilaterally ipsilateral contralateral proximal distal
proximally distally medial medially laterally lateral dorsal ventral cranial caudal cephalad
caudally upward downward rightward leftward midline paramedian median midthoracic
midcervical upper lower mid multilevel multisegmental segment diffuse predominant
predominantly predominance pronounced borderline top upper lower limits bronchovascular
markings marking interstitial prominence fullness effect mass effect support devices device
air bronchogram bronchograms parapneumonic compressive passive relaxation dependent
obstructive round rounded formation forming formed joint joints articular arthropathy
highly mildly minimally slightly somewhat grossly frankly frank overt overtly typical
typically atypical classic repeat repeated follow followup helpful helpful useful advised
advise suggested consider considered warranted treatment treated therapy response document
documented documentation studies study prior priors previous comparison comparisons
x xxxx b kerley kerleys vascular pedicle azygoesophageal paratracheal aortopulmonary
anteroposterior posteroanterior semi erect recumbent
about absent acute aerated aeration airless expanded reexpanded reexpansion
adenopathy appreciable appreciably apparent approximately measuring measures
calcified uncalcified partially fully completely incompletely
cardiomegaly cardiac enlargement cardiothoracic ratio globular configuration
distended distension distention decompressed gas gaseous pattern nonspecific specific
nonobstructive obstructive unremarkable remarkable
increase increases decrease decreases improvement improvements progression progressive
progressed regression regressed evolving evolution evolved developing developed
development interval intervally redemonstrated visualized nonvisualized
mediastinum widened widening wide narrow tortuous ectatic dilated aneurysmal
small smaller tiny minute large larger huge giant moderate moderately sized
left right both either neither each every all several few many numerous innumerable
cardiopulmonary pulmonary cardiovascular cardiothoracic thoracoabdominal abdominal
pelvis pelvic hip hips extremity extremities arm arms hand elbow wrist forearm
anterolateral posterolateral anteromedial posteromedial infrahilar suprahilar
posteriorly sternoclavicular sequela today yesterday tomorrow week weeks month months year
years hour hours
"""


def radiology_words() -> list[str]:
    """The word list, lower-cased, each word once, sorted (hyphenated entries as words)."""
    return sorted(set(re.findall(r"[a-z]+|[0-9]+", _WORDS.lower())))


def word_pieces(words: Sequence[str], *, min_words: int = 3, min_length: int = 2,
                max_length: int = 8) -> list[str]:
    """Word pieces for words outside the list, deterministically: every prefix ("cardio") and
    suffix ("##osis") of `min_length` to `max_length` letters that at least `min_words` of
    `words` share (a word's own full form excluded), ranked by the characters they cover
    (words sharing it x its length), ties alphabetically. A WordPiece tokenizer then splits an
    unknown word like "lipomatosis" into a few such pieces rather than into letters.

    Not a trained BPE/WordPiece model: `tokenizers`' trainers break ties by hash-map order,
    so their vocabularies differ from process to process, and every center must build the same
    base LM."""
    counts: Counter[str] = Counter()
    for word in dict.fromkeys(words):
        pieces = set()
        for k in range(min_length, min(max_length, len(word) - 1) + 1):
            pieces.add(word[:k])
            pieces.add("##" + word[len(word) - k:])
        counts.update(pieces)
    kept = [p for p, c in counts.items() if c >= min_words]
    return sorted(kept, key=lambda p: (-counts[p] * len(p.removeprefix("##")), p))
